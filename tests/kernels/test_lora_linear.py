"""Paged LoRA op: reference vs dense math (proves the layout contract), Triton kernels vs reference.

On a machine without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in this
folder's conftest); with a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_plugin.kernels.expand import paged_lora_expand
from slora_plugin.kernels.lora_linear import (
    bound_violations,
    launch_plans,
    lora_linear_exact,
    lora_linear_ref,
    paged_lora_linear,
)
from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.kernels.shrink import paged_lora_shrink, shrink_buffer
from slora_plugin.kernels.tiling import CPU_SMS, KernelConfig, decode_config, prefill_config
from slora_plugin.layout import MODULES, ModelDims
from synthetic_pool import SyntheticPool, build_synthetic_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: tests/conftest.py's TINY_LLAMA (GQA: 4 query heads, 2 KV heads of 16).
DIMS = ModelDims(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=96, num_hidden_layers=2)
MAX_RANK = 128
#: vLLM's fused layers as (module ids, in_features, slice widths) of the tiny GQA model.
LAYERS = {
    "qkv_proj": ((0, 1, 2), 64, (64, 32, 32)),
    "o_proj": ((3,), 64, (64,)),
    "gate_up_proj": ((4, 5), 64, (96, 96)),
    "down_proj": ((6,), 96, (64,)),
}
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@dataclass
class Case:
    dtype: torch.dtype
    layer: str
    sp: SyntheticPool
    token_slot: torch.Tensor   # [T], given to SegmentMeta.update
    x: torch.Tensor            # [T + pad, K]: padded rows beyond T must stay untouched
    y_full: torch.Tensor       # [T + pad, N + 5]: y is a strided column view of it
    col0: int
    variant: str

    def __repr__(self) -> str:  # hypothesis prints failing cases: shapes and tables, not tensors
        return (f"Case({self.dtype}, {self.layer}, variant={self.variant}, col0={self.col0}, "
                f"x={tuple(self.x.shape)}, token_slot={self.token_slot.tolist()}, "
                f"ranks={self.sp.ranks.tolist()}, page_elems={self.sp.page_elems})")


@st.composite
def cases(draw) -> Case:
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    layer = draw(st.sampled_from(sorted(LAYERS)))
    module_ids, k_in, widths = LAYERS[layer]
    num_slots = draw(st.integers(1, 5))
    rank = st.one_of(st.just(0), st.integers(1, MAX_RANK), st.sampled_from([1, MAX_RANK]))
    slot_ranks = [{m: draw(rank) for m in MODULES} for _ in range(num_slots)]
    page_elems = draw(st.sampled_from([96, 100, 160, 512, 4096]))  # 100: rows not 16-byte aligned
    segments = draw(st.lists(st.tuples(st.integers(-1, num_slots - 1), st.sampled_from([1, 1, 2, 5, 17, 40])),
                             min_size=1, max_size=5))
    slots = [s for s, n in segments for _ in range(n)]
    if draw(st.booleans()):  # decode-like: adapters interleaved, one token per sequence
        slots = draw(st.permutations(slots))
    pad = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    sp = build_synthetic_pool(DIMS, slot_ranks, page_elems, dtype, DEVICE, MAX_RANK, generator=gen,
                              random_scales=True, spare_blocks=draw(st.integers(1, 3)))
    t = len(slots)
    x = torch.randn(t + pad, k_in, generator=gen, device=DEVICE).to(dtype)
    col0 = draw(st.integers(0, 5))
    y_full = torch.randn(t + pad, sum(widths) + 5, generator=gen, device=DEVICE).to(dtype)
    return Case(dtype, layer, sp, torch.tensor(slots, dtype=torch.int32, device=DEVICE), x, y_full, col0,
                draw(st.sampled_from(["auto", "decode", "prefill", "odd", "persistent"])))


def view_y(case: Case, y_full: torch.Tensor) -> torch.Tensor:
    return y_full[:, case.col0:case.col0 + sum(LAYERS[case.layer][2])]


def padded_slots(case: Case) -> torch.Tensor:
    pad = case.x.shape[0] - case.token_slot.numel()
    return torch.cat([case.token_slot, torch.full((pad,), -1, dtype=torch.int32, device=DEVICE)])


def dense_expected(case: Case) -> torch.Tensor:
    """y_full after the op, from the dense PEFT-shaped weights (not through the pool)."""
    module_ids, _, widths = LAYERS[case.layer]
    out = case.y_full.float().clone()
    for t, s in enumerate(case.token_slot.tolist()):
        if s < 0:
            continue
        off = case.col0
        for m, w in zip(module_ids, widths):
            if MODULES[m] in case.sp.weights[s]:
                a, b = case.sp.weights[s][MODULES[m]]
                h = case.x[t].float() @ a.float().t()
                out[t, off:off + w] += float(case.sp.scales[s, m]) * (h @ b.float().t())
            off += w
    return out


def assert_matches(case: Case, got_full: torch.Tensor, want_full: torch.Tensor, ulps: float) -> None:
    """Rows of slot -1 (and padding) and the columns outside y: bit-exact; the rest within rounding."""
    eps = EPS[case.dtype]
    untouched = torch.ones_like(got_full, dtype=torch.bool)
    n = sum(LAYERS[case.layer][2])
    lora_rows = padded_slots(case) >= 0
    untouched[lora_rows, case.col0:case.col0 + n] = False
    assert torch.equal(got_full[untouched], case.y_full[untouched]), "an element outside the LoRA rows/slices changed"
    assert not torch.isnan(got_full).any(), "NaN: a read outside the adapter rows (pool poison)"
    torch.testing.assert_close(got_full.float(), want_full.float(), rtol=ulps * eps, atol=ulps * eps)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=cases())
def test_reference_matches_dense_weights(case: Case) -> None:
    """Reading through shuffled pages + row tables == PEFT math on the original weights."""
    module_ids, _, widths = LAYERS[case.layer]
    got = case.y_full.clone()
    lora_linear_ref(view_y(case, got), case.x, case.sp.pool, padded_slots(case), case.sp.a_addr,
                    case.sp.b_addr, case.sp.ranks, case.sp.scales, module_ids, widths)
    assert_matches(case, got, dense_expected(case), ulps=1.0)


def config_for(case: Case):
    k_in = LAYERS[case.layer][1]
    return {"auto": None, "decode": decode_config(k_in, MAX_RANK), "prefill": prefill_config(k_in, MAX_RANK),
            # uneven K split with an empty last split, 4 rank tiles, narrow output tiles
            "odd": KernelConfig(block_m=16, split_k=3, block_r=32, block_k=16, block_n=16, block_kr=16),
            # 2 programs in all (CPU_SMS x 1) looping over every task; K split in 5 at <= 4 work items,
            # 3 or 4 at 5..10 (the expand sums a runtime number of partials), else 2 (unrolled)
            "persistent": KernelConfig(block_m=16, split_k=2, block_r=16, block_k=16, block_n=32, block_kr=16,
                                       shrink_programs_per_sm=1, expand_programs_per_sm=1,
                                       small_items=4, small_split_k=5),
            }[case.variant]


@settings(SETTINGS, max_examples=25)
@given(case=cases())
def test_triton_matches_reference(case: Case) -> None:
    """Within the error a correct fp32-accumulating, tf32-expand kernel may have (`lora_linear_exact`)."""
    module_ids, _, widths = LAYERS[case.layer]
    exact = case.y_full.double().clone()
    view_exact, view_allowed = lora_linear_exact(
        view_y(case, case.y_full), case.x, case.sp.pool, padded_slots(case), case.sp.a_addr, case.sp.b_addr,
        case.sp.ranks, case.sp.scales, module_ids, widths)
    allowed = torch.zeros_like(exact)
    view_y(case, exact).copy_(view_exact)
    view_y(case, allowed).copy_(view_allowed)
    num_slots = case.sp.ranks.shape[0]
    meta = SegmentMeta(max_tokens=case.x.shape[0] + 2, max_slots=num_slots, device=DEVICE)
    meta.update(case.token_slot)
    config = config_for(case)
    got = case.y_full.clone()
    if config is None:
        paged_lora_linear(view_y(case, got), case.x, case.sp.pool, meta, case.sp.a_addr, case.sp.b_addr,
                          case.sp.ranks, case.sp.scales, module_ids, widths, MAX_RANK)
    else:  # explicit shrink/expand with a NaN-poisoned h: expand may read only what shrink wrote
        h = shrink_buffer(case.x.shape[0], len(module_ids), MAX_RANK, config, DEVICE).fill_(float("nan"))
        paged_lora_shrink(h, case.x, case.sp.pool, meta, case.sp.a_addr, case.sp.ranks, module_ids, MAX_RANK, config)
        paged_lora_expand(view_y(case, got), h, case.sp.pool, meta, case.sp.b_addr, case.sp.ranks,
                          case.sp.scales, module_ids, widths, MAX_RANK, config)
    bad, worst = bound_violations(got, exact, allowed)
    assert bad == 0, f"{bad} elements outside the error bound (worst |err| / allowed = {worst:.3g})"


LLAMA2_DOWN = ModelDims(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                        intermediate_size=11008, num_hidden_layers=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_error_bound_admits_correct_rounding_and_catches_a_dropped_rank_row(dtype: torch.dtype) -> None:
    """The bound the kernel tests use, at Llama-2-7B down_proj size (K = 11008, the longest sum):
    the fp32 reference and a tf32-expand emulation (h truncated to 10 mantissa bits, as a tensor
    core may) are inside it; the same op with one rank row dropped, or one slice's scale off by
    1/64, is not."""
    gen = torch.Generator().manual_seed(3)
    slots = [{"down_proj": 128}, {"down_proj": 8}, {"down_proj": 1}]
    sp = build_synthetic_pool(LLAMA2_DOWN, slots, 2 * 16 * 32 * 128, dtype, "cpu", 128, generator=gen,
                              random_scales=True)
    token_slot = torch.tensor([0, 1, -1, 2, 0, 1, 0, 2] * 4, dtype=torch.int32)
    x = torch.randn(token_slot.numel(), 11008, generator=gen).to(dtype)
    y0 = torch.randn(token_slot.numel(), 4096, generator=gen).to(dtype)
    args = (x, sp.pool, token_slot, sp.a_addr, sp.b_addr)
    exact, allowed = lora_linear_exact(y0, *args, sp.ranks, sp.scales, (6,), (4096,))

    fp32 = y0.clone()
    lora_linear_ref(fp32, *args, sp.ranks, sp.scales, (6,), (4096,))
    assert bound_violations(fp32, exact, allowed)[0] == 0

    tf32 = y0.float().clone()
    for t, s in enumerate(token_slot.tolist()):
        if s >= 0:
            a, b = (w.float() for w in sp.weights[s]["down_proj"])
            h = x[t].float() @ a.t()
            h_tf32 = (h.view(torch.int32) & ~0x1FFF).view(torch.float32)
            tf32[t] += float(sp.scales[s, 6]) * (h_tf32 @ b.t())
    assert bound_violations(tf32.to(dtype), exact, allowed)[0] == 0

    dropped = y0.clone()
    ranks = sp.ranks.clone()
    ranks[0, 6] -= 1                                       # rank 128 -> 127: the last row is skipped
    lora_linear_ref(dropped, *args, ranks, sp.scales, (6,), (4096,))
    bad, _ = bound_violations(dropped, exact, allowed)
    assert bad > 0.25 * 12 * 4096, f"a dropped row of a rank-128 adapter moved only {bad} elements out of bound"

    scaled = y0.clone()
    scales = sp.scales.clone()
    scales[1, 6] *= 1 + 2.0 ** -6
    lora_linear_ref(scaled, *args, sp.ranks, scales, (6,), (4096,))
    assert bound_violations(scaled, exact, allowed)[0] > 0


def _tiny_case(token_slot: list[int], seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    ranks = [{m: r for m in MODULES} for r in (16, 1, 40, 128)]
    sp = build_synthetic_pool(DIMS, ranks, 512, torch.float16, DEVICE, MAX_RANK, generator=gen, random_scales=True)
    slots = torch.tensor(token_slot, dtype=torch.int32, device=DEVICE)
    x = torch.randn(len(token_slot), 64, generator=gen, device=DEVICE).to(torch.float16)
    y = torch.randn(len(token_slot), 128, generator=gen, device=DEVICE).to(torch.float16)
    return sp, slots, x, y


@pytest.mark.parametrize(("num_tokens", "small_items", "split"), [(1, 4, 5), (13, 4, 5), (37, 3, 3), (37, 0, 2)])
def test_few_programs_loop_over_all_tasks(num_tokens: int, small_items: int, split: int) -> None:
    """qkv_proj with 2 programs in all (fewer than the real tasks, so each loops), token counts
    that are not multiples of the 16-token tile, 4 work items split K in 5 (past K's end: empty
    splits), 3 and 2 (unrolled in the expand), a NaN-poisoned h: within the error bound of every
    element."""
    module_ids, _, widths = LAYERS["qkv_proj"]
    token_slot = [(3 * t + 1) % 5 - 1 for t in range(num_tokens)]  # 0, 3, 1, -1, 2, ...
    sp, slots, x, y = _tiny_case(token_slot, seed=num_tokens)
    config = KernelConfig(block_m=16, split_k=2, block_r=16, block_k=16, block_n=32, block_kr=16,
                          shrink_programs_per_sm=1, expand_programs_per_sm=1, small_items=small_items,
                          small_split_k=5)
    meta = SegmentMeta(max_tokens=64, max_slots=4, device=DEVICE)
    meta.update(slots)
    shrink, expand = launch_plans(y, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales, module_ids, widths,
                                  MAX_RANK, config)
    real = int(meta.work_count[16])
    assert real >= 1 and shrink.grid[0] == expand.grid[0] == 2
    assert config.split_for(real) == split
    assert real * 3 * 8 * split > 2 and real * expand.args["n_tiles"] > 2
    exact, allowed = lora_linear_exact(y, x, sp.pool, slots, sp.a_addr, sp.b_addr, sp.ranks, sp.scales,
                                       module_ids, widths)
    h = shrink_buffer(num_tokens, 3, MAX_RANK, config, DEVICE).fill_(float("nan"))
    got = y.clone()
    paged_lora_shrink(h, x, sp.pool, meta, sp.a_addr, sp.ranks, module_ids, MAX_RANK, config)
    paged_lora_expand(got, h, sp.pool, meta, sp.b_addr, sp.ranks, sp.scales, module_ids, widths, MAX_RANK, config)
    bad, worst = bound_violations(got, exact, allowed)
    assert bad == 0, f"{bad} elements outside the error bound (worst |err| / allowed = {worst:.3g})"
    assert torch.equal(got[slots < 0], y[slots < 0])
    # the task counters reset themselves: zero after the calls, and the same launches run again
    # (as a CUDA graph replays them) redo every task, bit for bit
    assert torch.equal(meta.sched, torch.zeros_like(meta.sched)), meta.sched
    again = y.clone()
    paged_lora_shrink(h.fill_(float("nan")), x, sp.pool, meta, sp.a_addr, sp.ranks, module_ids, MAX_RANK, config)
    paged_lora_expand(again, h, sp.pool, meta, sp.b_addr, sp.ranks, sp.scales, module_ids, widths, MAX_RANK, config)
    assert torch.equal(again, got)
    replayed = y.clone()
    shrink, expand = launch_plans(replayed, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales,
                                  module_ids, widths, MAX_RANK, config)
    shrink(), expand()
    assert torch.equal(replayed, got)
    twice = got.clone()
    paged_lora_expand(twice, h, sp.pool, meta, sp.b_addr, sp.ranks, sp.scales, module_ids, widths, MAX_RANK, config)
    assert not torch.equal(twice, got)
    shrink(), expand()  # the same launches again: y += delta a second time
    assert torch.equal(replayed, twice)
    assert torch.equal(meta.sched, torch.zeros_like(meta.sched)), meta.sched


def test_no_adapter_tokens_means_no_work() -> None:
    """A step whose tokens all have no adapter (or an out-of-range slot): zero real work items,
    the output unchanged bit for bit, and a grid capped by the SM count, not by the bound."""
    sp, slots, x, y = _tiny_case([-1, 7, -1, -5] * 10)
    meta = SegmentMeta(max_tokens=64, max_slots=4, device=DEVICE)
    meta.update(torch.zeros(40, dtype=torch.int32, device=DEVICE))  # stale work from a previous step
    meta.update(slots)
    assert all(int(c) == 0 for c in meta.work_count.values())
    got = y.clone()
    paged_lora_linear(got, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales, (0, 1, 2), (64, 32, 32),
                      MAX_RANK)
    assert torch.equal(got, y)
    config = decode_config(64, MAX_RANK)
    shrink, expand = launch_plans(y, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales, (0, 1, 2),
                                  (64, 32, 32), MAX_RANK)
    assert shrink.grid == (config.shrink_programs_per_sm * CPU_SMS,)
    assert expand.grid == (config.expand_programs_per_sm * CPU_SMS,)
    assert meta.work_bound(40, 16) * 3 > shrink.grid[0]


def test_bad_inputs_are_named() -> None:
    meta = SegmentMeta(max_tokens=4, max_slots=2, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        meta.update(torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="max_tokens"):
        meta.update(torch.zeros(5, dtype=torch.int32, device=DEVICE))
    sp = build_synthetic_pool(DIMS, [{"q_proj": 4}, {}], 512, torch.float16, DEVICE, 8)
    x = torch.zeros(3, 64, dtype=torch.float16, device=DEVICE)
    y = torch.zeros(3, 64, dtype=torch.float16, device=DEVICE)
    meta.update(torch.zeros(4, dtype=torch.int32, device=DEVICE))
    args = (sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales)
    with pytest.raises(ValueError, match="update was given 4 tokens"):
        paged_lora_linear(y, x, *args, (0,), (64,), 8)
    meta.update(torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="pool must be"):
        paged_lora_linear(y, x, sp.pool.float(), *args[1:], (0,), (64,), 8)
    with pytest.raises(ValueError, match="max_rank"):
        paged_lora_linear(y, x, *args, (0,), (64,), 9)
    with pytest.raises(ValueError, match="sum of slice_widths"):
        paged_lora_linear(y, x, *args, (0,), (32,), 8)
    with pytest.raises(ValueError, match="module ids"):
        paged_lora_linear(y, x, *args, (0, 1, 2, 3), (16,) * 4, 8)
