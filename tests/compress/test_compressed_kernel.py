"""The compressed-collection op (Triton core product between two GEMMs) against the fp64 torch
reference: under TRITON_INTERPRET=1 on CPU in fp64 and fp32 (hypothesis, small shapes), and on a
GPU in fp16/bf16, inside a CUDA graph too (marker gpu)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_plugin.core_layout import pack_cores, plan_cores
from slora_plugin.kernels.compressed_lora import CompressedWorkspace, compressed_lora_linear
from slora_plugin.kernels.compressed_reference import compressed_lora_exact
from synthetic_cores import SyntheticCores, build_synthetic_cores
from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.layout import LayoutError, MODULES

#: Module (d_in, d_out) of the tiny GQA model (tests/tiny_model.py) and vLLM's fused layers.
MODULE_IO = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
             "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}
LAYERS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
          "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass
class Case:
    dtype: torch.dtype
    layer: str
    rank: int
    diagonal: bool
    sc: SyntheticCores
    token_slot: torch.Tensor   # [T] for SegmentMeta.update
    x: torch.Tensor            # [T + pad, d_in]: rows past T are padding, left untouched
    y_full: torch.Tensor       # [T + pad, N + 5]: y is a column view of it
    col0: int

    def __repr__(self) -> str:
        return (f"Case({self.dtype}, {self.layer}, K={self.rank}, diagonal={self.diagonal}, x={tuple(self.x.shape)}, "
                f"token_slot={self.token_slot.tolist()}, groups={self.sc.slot_group.tolist()}, "
                f"has_core={self.sc.has_core.tolist()})")


def make_case(dtype, layer, rank, diagonal, slot_mods, groups, num_groups, page_elems, slots, pad, seed,
              device="cpu") -> Case:
    gen = torch.Generator().manual_seed(seed)
    io = {m: MODULE_IO[m] for m in LAYERS[layer]}
    sc = build_synthetic_cores(io, slot_mods, groups, num_groups, rank, diagonal, page_elems, dtype, device, gen)
    t = len(slots)
    d_in = io[LAYERS[layer][0]][0]
    width = sum(io[m][1] for m in LAYERS[layer])
    x = torch.randn(t + pad, d_in, generator=gen, dtype=torch.float64).to(dtype).to(device)
    col0 = seed % 5
    y_full = torch.randn(t + pad, width + 5, generator=gen, dtype=torch.float64).to(dtype).to(device)
    token_slot = torch.tensor(slots, dtype=torch.int32, device=device)
    return Case(dtype, layer, rank, diagonal, sc, token_slot, x, y_full, col0)


def run(case: Case) -> torch.Tensor:
    """The op on the case; returns y_full after it (the case's tensors are left unchanged)."""
    mods = LAYERS[case.layer]
    widths = [MODULE_IO[m][1] for m in mods]
    t = case.token_slot.numel()
    meta = SegmentMeta(max_tokens=t + 8, max_slots=case.sc.core_addr.shape[0], device=case.x.device)
    meta.update(case.token_slot)
    y_full = case.y_full.clone()
    y = y_full[:, case.col0:case.col0 + sum(widths)]
    bases = [case.sc.bases[m] for m in mods]
    ws = CompressedWorkspace(case.x.shape[0], max(b.width for b in bases), case.dtype, case.x.device)
    compressed_lora_linear(y, case.x, case.sc.pool, meta, case.sc.core_addr, case.sc.has_core, case.sc.slot_group,
                           bases, [MODULES.index(m) for m in mods], widths, case.diagonal, ws)
    return y_full


def expected(case: Case) -> torch.Tensor:
    mods = LAYERS[case.layer]
    widths = [MODULE_IO[m][1] for m in mods]
    t = case.token_slot.numel()
    slots = torch.cat([case.token_slot, torch.full((case.x.shape[0] - t,), -1, dtype=torch.int32,
                                                   device=case.x.device)])  # padding: no adapter
    full = case.y_full.double().clone()
    full[:, case.col0:case.col0 + sum(widths)] = compressed_lora_exact(
        case.y_full[:, case.col0:case.col0 + sum(widths)], case.x, case.sc.pool, slots, case.sc.core_addr,
        case.sc.has_core, case.sc.slot_group, [case.sc.bases[m] for m in mods], [MODULES.index(m) for m in mods],
        widths, case.diagonal)
    return full


def check(case: Case, rtol: float) -> None:
    got, want = run(case), expected(case)
    assert not torch.isnan(got).any(), case
    touched = torch.zeros_like(want, dtype=torch.bool)
    mods = LAYERS[case.layer]
    width = sum(MODULE_IO[m][1] for m in mods)
    for i, s in enumerate(case.token_slot.tolist()):
        if s >= 0:
            touched[i, case.col0:case.col0 + width] = True
    # untouched elements (other columns, padding rows, tokens without an adapter) are bit-equal
    assert torch.equal(got[~touched], case.y_full[~touched]), case
    scale = want[touched].abs().max() if touched.any() else 1.0
    err = (got.double() - want)[touched].abs().max() if touched.any() else 0.0
    assert err <= rtol * scale, (float(err), float(scale), case)


@st.composite
def cases(draw) -> Case:
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    layer = draw(st.sampled_from(sorted(LAYERS)))
    rank = draw(st.sampled_from([1, 3, 8, 16, 20, 32]))
    diagonal = draw(st.booleans())
    num_groups = draw(st.integers(1, 3))
    num_slots = draw(st.integers(1, 4))
    slot_mods = [draw(st.lists(st.sampled_from(list(LAYERS[layer])), unique=True)) for _ in range(num_slots)]
    groups = [draw(st.integers(0, num_groups - 1)) for _ in range(num_slots)]
    page_elems = draw(st.sampled_from([rank, rank + 3, 64, 512]))
    segments = draw(st.lists(st.tuples(st.integers(-1, num_slots - 1), st.sampled_from([1, 2, 5, 17])),
                             min_size=1, max_size=4))
    slots = [s for s, n in segments for _ in range(n)]
    if draw(st.booleans()):
        slots = draw(st.permutations(slots))
    return make_case(dtype, layer, rank, diagonal, slot_mods, groups, num_groups, page_elems, slots,
                     draw(st.integers(0, 2)), draw(st.integers(0, 2 ** 31 - 1)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_kernel_matches_reference(case):
    check(case, 1e-12 if case.dtype == torch.float64 else 2e-5)


def test_fixed_cases_cover_full_diagonal_groups_and_missing_cores():
    """Deterministic: every branch at least once (hypothesis may not draw them all in 25 examples)."""
    for diagonal in (False, True):
        case = make_case(torch.float64, "qkv_proj", 16, diagonal,
                         [["q_proj", "v_proj"], ["k_proj"], ["q_proj", "k_proj", "v_proj"]], [0, 1, 1], 2, 64,
                         [0, 1, -1, 2, 2, 0] + [2] * 17, pad=2, seed=7)
        check(case, 1e-12)


def test_tables_and_shapes_are_checked():
    case = make_case(torch.float32, "o_proj", 8, False, [["o_proj"]], [0], 1, 64, [0, 0], 0, 1)
    bad = make_case(torch.float32, "o_proj", 8, True, [["o_proj"]], [0], 1, 64, [0, 0], 0, 1)
    with pytest.raises(ValueError, match="core_addr must be int64"):  # diagonal tables, full cores
        run(Case(case.dtype, case.layer, 8, False, bad.sc, case.token_slot, case.x, case.y_full, 0))
    with pytest.raises(ValueError, match="share a float dtype"):
        run(Case(torch.float32, case.layer, 8, False, SyntheticCores(case.sc.pool.double(), case.sc.core_addr,
                 case.sc.has_core, case.sc.slot_group, case.sc.bases), case.token_slot, case.x, case.y_full, 0))
    with pytest.raises(LayoutError, match="does not fit"):
        plan_cores(["q_proj"], 32, False, 16)


def test_core_layout_rows_never_straddle_pages():
    lay = plan_cores(["v_proj", "q_proj"], 5, False, 12)  # 2 rows of 5 per page of 12
    assert list(lay.rows) == ["q_proj", "v_proj"] and lay.num_pages == 5
    assert lay.rows["q_proj"] == (0, 5, 12, 17, 24) and lay.rows["v_proj"][0] == 29
    pages = torch.full((lay.num_pages, 12), float("nan"), dtype=torch.float64)
    core = torch.arange(25, dtype=torch.float64).view(5, 5)
    pack_cores(lay, {"q_proj": core}, pages)  # v_proj absent in this layer: zero rows
    flat = pages.view(-1)
    assert torch.equal(flat[17:22], core[3]) and torch.equal(flat[29:34], torch.zeros(5, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("diagonal", [False, True])
def test_gpu_llama_shapes(dtype, diagonal):
    """Llama-3-8B gate_up_proj (4096 -> 2 x 14336) and qkv_proj, K = 64, 2 clusters, 300 tokens of
    64 adapters: within the rounding of z, w and y in the activation dtype."""
    global MODULE_IO
    saved = MODULE_IO
    MODULE_IO = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                 "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
    try:
        for layer in ("qkv_proj", "gate_up_proj"):
            g = torch.Generator().manual_seed(0)
            slots = torch.randint(-1, 64, (300,), generator=g).tolist()
            case = make_case(dtype, layer, 64, diagonal, [list(LAYERS[layer])] * 64,
                             [i % 2 for i in range(64)], 2, 8192, slots, 0, 3, device="cuda")
            eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
            got, want = run(case), expected(case)
            delta = (want - case.y_full.double()).abs().max()
            assert float((got.double() - want).abs().max()) <= 8 * eps * float(delta + case.y_full.abs().max())
    finally:
        MODULE_IO = saved


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Captured once, replayed with other token slots (same padded count): the result follows the
    new slots (fixed-address buffers, grid from the token count only)."""
    dtype = torch.float16
    case = make_case(dtype, "o_proj", 32, False, [["o_proj"]] * 8, [0, 1] * 4, 2, 4096, [0] * 64, 0, 5,
                     device="cuda")
    widths = [MODULE_IO["o_proj"][1]]
    meta = SegmentMeta(max_tokens=64, max_slots=8, device="cuda")
    ws = CompressedWorkspace(64, 64, dtype, "cuda")
    token_slot = torch.zeros(64, dtype=torch.int32, device="cuda")
    y = case.y_full[:, :widths[0]].clone()

    def step():
        meta.update(token_slot)
        compressed_lora_linear(y, case.x, case.sc.pool, meta, case.sc.core_addr, case.sc.has_core,
                               case.sc.slot_group, [case.sc.bases["o_proj"]], [3], widths, False, ws)

    y0 = y.clone()
    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        new = torch.randint(-1, 8, (64,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        token_slot.copy_(new)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        want = compressed_lora_exact(y0, case.x, case.sc.pool, new.cuda(), case.sc.core_addr, case.sc.has_core,
                                     case.sc.slot_group, [case.sc.bases["o_proj"]], [3], widths, False)
        assert float((y.double() - want).abs().max()) <= 2.0 ** -7 * float(want.abs().max())
