"""Page writer: raw records -> pages, bit-identical to `layout.pack_layer` of (A, B * scale) with B
scaled in fp32 and rounded once (what the host packer wrote before), rows past a layer's rank and
page gaps zero, other blocks untouched. The Triton kernel runs interpreted on CPU here (compiled
on the GPU in the `gpu` test, through the worker's `PageLoader` with chunked double buffering)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_model import TINY_LLAMA
from slora_plugin.kernels.page_writer import page_gaps, write_pages, write_pages_ref, writer_plan
from slora_plugin.layout import MODULES, ModelDims, pack_layer, plan_layout
from slora_plugin.raw_format import RawAdapter, raw_layout, record_bytes_bound

DIMS = ModelDims.from_hf_config(SimpleNamespace(**TINY_LLAMA))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there, interpreted here
DT = [torch.float16, torch.bfloat16, torch.float32]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def random_raw(layout, dtype, g, num_layers):
    """A raw adapter with per-layer ranks <= the layout rank and scales of both signs; returns it
    and the expected (A, B * scale) per layer, built the way the host packer did."""
    rl = raw_layout(layout, num_layers, dtype)
    raw = RawAdapter(torch.randint(0, 255, (rl.nbytes,), dtype=torch.uint8, generator=g), rl)
    expect = [{} for _ in range(num_layers)]
    for rm in rl.modules:
        for layer in range(num_layers):
            r = int(torch.randint(0, rm.rank + 1, (1,), generator=g))
            scale = float(torch.randn(1, generator=g)) * 4
            a = torch.randn(r, rm.in_features, generator=g).to(dtype)
            b = (torch.randn(rm.out_features, r, generator=g) * 3).to(dtype)
            raw.a(rm.module)[layer].zero_()
            raw.b(rm.module)[layer].zero_()
            raw.a(rm.module)[layer, :r] = a
            raw.b(rm.module)[layer, :, :r] = b
            raw.scales()[layer, rm.index] = scale
            raw.layer_ranks()[layer, rm.index] = r
            full_a = torch.zeros(rm.rank, rm.in_features, dtype=dtype)
            full_b = torch.zeros(rm.out_features, rm.rank, dtype=dtype)
            full_a[:r] = a
            full_b[:, :r] = (b.float() * scale).to(dtype)  # fp32 product, one rounding
            expect[layer][rm.module] = (full_a, full_b)
    return raw, expect


@settings(max_examples=25, deadline=None)
@given(ranks=st.dictionaries(st.sampled_from(MODULES), st.integers(0, 9), min_size=1),
       page=st.sampled_from([96, 200, 512, 4096]), dtype=st.sampled_from(DT), seed=st.integers(0, 999),
       first=st.integers(0, 1))
def test_kernel_and_reference_equal_pack_layer(ranks, page, dtype, seed, first):
    g = torch.Generator().manual_seed(seed)
    layout = plan_layout(ranks, DIMS, page)
    raw, expect = random_raw(layout, dtype, g, DIMS.num_hidden_layers)
    nb = layout.num_pages + 4
    blocks = torch.randperm(nb, generator=g)[:layout.num_pages]
    outside = [b for b in range(nb) if b not in blocks.tolist()]
    # NaN everywhere: anything not written shows; the blocks outside the adapter must stay NaN
    pools = [torch.full((nb * page,), float("nan"), dtype=dtype, device=DEVICE)
             for _ in range(DIMS.num_hidden_layers)]
    ref = [torch.full((nb * page,), float("nan"), dtype=dtype) for _ in range(DIMS.num_hidden_layers)]
    plan = writer_plan(layout, raw.layout)
    table = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=DEVICE)
    # records from `first` on, staged alone (as a later run of a chunked load is)
    staged = raw.records()[first:].reshape(-1).to(DEVICE)
    write_pages(table, staged, raw.layout, plan.jobs.to(DEVICE), plan.rows.to(DEVICE), plan.block_r,
                plan.block_c, blocks.to(DEVICE), first, DIMS.num_hidden_layers - first, page)
    pools = [p.cpu() for p in pools]
    write_pages_ref(ref, raw.records()[first:], raw.layout, layout, blocks.tolist(), first)
    bits = BITS[dtype]
    for layer in range(first, DIMS.num_hidden_layers):
        want = torch.zeros(layout.num_pages, page, dtype=dtype)
        pack_layer(layout, expect[layer], want)
        got = pools[layer].view(nb, page)
        assert torch.equal(got[blocks].view(bits), want.view(bits)), layer
        assert torch.equal(ref[layer].view(nb, page)[blocks].view(bits), want.view(bits)), layer
        assert got[outside].isnan().all()
    for layer in range(first):
        assert pools[layer].isnan().all()


def test_gaps_and_rows_tile_the_pages_exactly():
    for ranks, page in (({"q_proj": 3, "down_proj": 5}, 200), ({"gate_proj": 2, "o_proj": 7}, 96)):
        layout = plan_layout(ranks, DIMS, page)
        cover = torch.zeros(layout.num_pages * page, dtype=torch.int32)
        for pl in layout.modules.values():
            for off in pl.a_rows:
                cover[off:off + pl.in_features] += 1
            for off in pl.b_rows:
                cover[off:off + pl.out_features] += 1
        for off, n in page_gaps(layout):
            assert off // page == (off + n - 1) // page  # a gap piece never straddles a page
            cover[off:off + n] += 1
        assert bool((cover == 1).all())


def test_write_pages_refuses_what_does_not_fit():
    layout = plan_layout({"q_proj": 4}, DIMS, 256)
    rl = raw_layout(layout, DIMS.num_hidden_layers, torch.float16)
    plan = writer_plan(layout, rl)
    pools = torch.zeros(2, 4 * 256, dtype=torch.float16)
    table = torch.tensor([pools[0].data_ptr(), pools[1].data_ptr()])
    with pytest.raises(ValueError, match="do not fit"):
        write_pages(table, torch.zeros(rl.record_bytes, dtype=torch.uint8), rl, plan.jobs, plan.rows, plan.block_r,
                    plan.block_c, torch.arange(layout.num_pages), 0, 2, 256)
    with pytest.raises(ValueError, match="pools"):
        write_pages(table, torch.zeros(3 * rl.record_bytes, dtype=torch.uint8), rl, plan.jobs,
                    plan.rows, plan.block_r, plan.block_c, torch.arange(layout.num_pages), 0, 3, 256)


def test_record_bound_covers_any_adapter_up_to_max_rank():
    full = plan_layout({m: 16 for m in MODULES}, DIMS, 4096)
    for dtype in DT:
        assert raw_layout(full, 1, dtype).record_bytes == record_bytes_bound(DIMS, 16, dtype)


@pytest.mark.gpu
def test_page_loader_on_gpu_equals_reference_under_chunking():
    """Compiled kernel, two staging buffers smaller than the adapter (several runs each load),
    back-to-back loads of different adapters into reused blocks: every page equals the reference."""
    from slora_plugin.worker.page_loader import PageLoader

    g = torch.Generator().manual_seed(0)
    dims = ModelDims(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                     intermediate_size=1376, num_hidden_layers=6)
    page = 4096
    for dtype in DT:
        adapters = []
        for ranks in ({"q_proj": 16, "v_proj": 8}, {m: 32 for m in MODULES}, {"down_proj": 5, "k_proj": 3}):
            layout = plan_layout(ranks, dims, page)
            raw, _ = random_raw(layout, dtype, g, dims.num_hidden_layers)
            raw = RawAdapter(raw.buffer.pin_memory(), raw.layout)
            adapters.append((layout, raw))
        staging = 2 * max(r.layout.record_bytes for _, r in adapters)  # 2 records: 3 runs of 6 layers
        loader = PageLoader("cuda", staging)
        nb = 256
        pools = [torch.full((nb * page,), -7.0, dtype=dtype, device="cuda")
                 for _ in range(dims.num_hidden_layers)]
        ref = [torch.full((nb * page,), -7.0, dtype=dtype) for _ in range(dims.num_hidden_layers)]
        copy = torch.cuda.Stream()
        for rep in range(3):
            for layout, raw in adapters:
                blocks = torch.randperm(nb, generator=g)[:layout.num_pages].tolist()
                with torch.cuda.stream(copy):
                    loader.load(pools, raw, layout, blocks)
                write_pages_ref(ref, raw.records(), raw.layout, layout, blocks)
        copy.synchronize()
        bits = BITS[dtype]
        for p, r in zip(pools, ref):
            assert torch.equal(p.cpu().view(bits), r.view(bits))
