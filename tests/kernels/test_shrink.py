"""The shrink launch alone against its reference (`shrink_ref`): the K-split partials it writes sum
to x @ A^T for every adapter token, slice and rank row, within the fp32 accumulation error, and the
rows of tokens without an adapter are left unwritten (h starts as NaN).

The cases cover each config shape: decode (K split chosen on the device from the work items: 8 for
this step's 4), prefill (64-token tiles), an uneven 3-way K split with an empty last split, and 2
programs looping over every task with a runtime split of 5; 100-element pages give rows that are
not 16-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.kernels.shrink import paged_lora_shrink, shrink_buffer, shrink_ref
from slora_plugin.kernels.tiling import KernelConfig, decode_config, prefill_config
from slora_plugin.layout import MODULES
from synthetic_pool import SyntheticPool, build_synthetic_pool
from test_lora_linear import DEVICE, DIMS, LAYERS, MAX_RANK

#: name -> (layer, tokens, page elements, dtype, config)
CASES = {
    "decode-qkv": ("qkv_proj", 13, 512, torch.float16, decode_config(64, MAX_RANK)),
    "prefill-qkv": ("qkv_proj", 70, 512, torch.bfloat16, prefill_config(64, MAX_RANK)),
    "odd-split-o": ("o_proj", 37, 100, torch.bfloat16,
                    KernelConfig(block_m=16, split_k=3, block_r=32, block_k=16, block_n=16, block_kr=16)),
    "persistent-gate_up": ("gate_up_proj", 5, 160, torch.float16,
                           KernelConfig(block_m=16, split_k=2, block_r=16, block_k=16, block_n=32, block_kr=16,
                                        shrink_programs_per_sm=1, expand_programs_per_sm=1, small_items=4,
                                        small_split_k=5)),
}


@dataclass
class Step:
    sp: SyntheticPool
    token_slot: torch.Tensor  # [T]: slots -1..3, interleaved
    x: torch.Tensor           # [T, K]
    meta: SegmentMeta
    split: int                # the K split both kernels compute for this step's work items


def make_step(layer: str, num_tokens: int, page_elems: int, dtype: torch.dtype, config: KernelConfig) -> Step:
    """4 adapters of ranks 16, 1, 40 and 128 on every module; tokens of slots 0, 3, 1, -1, 2, ..."""
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    ranks = [{m: r for m in MODULES} for r in (16, 1, 40, 128)]
    sp = build_synthetic_pool(DIMS, ranks, page_elems, dtype, DEVICE, MAX_RANK, generator=gen, random_scales=True)
    slots = torch.tensor([(3 * t + 1) % 5 - 1 for t in range(num_tokens)], dtype=torch.int32, device=DEVICE)
    x = torch.randn(num_tokens, LAYERS[layer][1], generator=gen, device=DEVICE).to(dtype)
    meta = SegmentMeta(max_tokens=num_tokens, max_slots=len(ranks), device=DEVICE)
    meta.update(slots)
    return Step(sp, slots, x, meta, config.split_for(int(meta.work_count[config.block_m])))


def live_rows(step: Step, module_ids: tuple[int, ...], width: int) -> torch.Tensor:
    """[T, slices, width] bool: the h entries shrink writes and expand reads (adapter token, k < r)."""
    k = torch.arange(width, device=DEVICE)
    slot = step.token_slot.long().clamp(min=0)
    r = step.sp.ranks[slot][:, list(module_ids)]                                     # [T, slices]
    return (step.token_slot >= 0)[:, None, None] & (k[None, None, :] < r[:, :, None])


@pytest.mark.parametrize("case", sorted(CASES))
def test_shrink_partials_sum_to_x_times_a(case: str) -> None:
    layer, num_tokens, page_elems, dtype, config = CASES[case]
    module_ids, k_in, _ = LAYERS[layer]
    step = make_step(layer, num_tokens, page_elems, dtype, config)
    sp = step.sp
    h = shrink_buffer(num_tokens, len(module_ids), MAX_RANK, config, DEVICE).fill_(float("nan"))
    paged_lora_shrink(h, step.x, sp.pool, step.meta, sp.a_addr, sp.ranks, module_ids, MAX_RANK, config)
    got = h[:step.split, :, :, :MAX_RANK].double().sum(0)
    want = shrink_ref(step.x, sp.pool, step.token_slot, sp.a_addr, sp.ranks, module_ids)
    # fp32 sums of exact products, in any order and split: at most K roundings of sum |x_j A_kj|
    # (2^-23: an MMA may truncate)
    allowed = k_in * 2.0 ** -23 * shrink_ref(step.x.abs(), sp.pool.abs(), step.token_slot, sp.a_addr, sp.ranks,
                                             module_ids)
    live = live_rows(step, module_ids, MAX_RANK)
    assert live.any() and step.split == {"decode-qkv": 8, "prefill-qkv": 1, "odd-split-o": 3,
                                         "persistent-gate_up": 5}[case]
    err = (got - want).abs()
    assert not torch.isnan(got[live]).any(), "a live (token, slice, rank row) entry was not written"
    assert (err[live] <= allowed[live]).all(), (
        f"{int((err[live] > allowed[live]).sum())} entries outside the bound, worst |err| / allowed = "
        f"{float((err[live] / allowed[live]).max()):.3g}")
    assert torch.isnan(h[:, step.token_slot < 0]).all(), "h rows of tokens without an adapter were written"
