"""Random adapters packed into a layer page pool through the real layout, for tests and benchmarks.

Not part of the installed package (nothing at run time needs it): the kernel tests import it as
`synthetic_pool` (pytest puts this folder on sys.path), `benchmarks/bench_kernels.py` loads it by file.

Going through `plan_layout` + `pack_layer` + `physical_rows` with shuffled block ids (instead of
writing rows at convenient addresses) means every kernel test also checks the layout contract.
Everything in the pool that is not an adapter row is NaN, and every unused table entry points at a
NaN page, so a kernel that reads one row too many, or at a wrong address, produces NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from slora_plugin.layout import MODULE_INDEX, MODULES, ModelDims, pack_layer, physical_rows, plan_layout


@dataclass
class SyntheticPool:
    """A layer pool with its per-slot tables (the kernel contract) and the dense weights it holds."""

    pool: torch.Tensor            # 1-D, the layer's pages viewed flat
    a_addr: torch.Tensor          # int64 [S, 7, R]
    b_addr: torch.Tensor          # int64 [S, 7, R]
    ranks: torch.Tensor           # int32 [S, 7]
    scales: torch.Tensor          # fp32  [S, 7]
    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per slot: module -> (A [r, in], B [out, r])
    page_elems: int


def build_synthetic_pool(dims: ModelDims, slot_ranks: Sequence[Mapping[str, int]], page_elems: int,
                         dtype: torch.dtype, device: torch.device | str, max_rank: int,
                         generator: torch.Generator | None = None, random_scales: bool = False,
                         spare_blocks: int = 1) -> SyntheticPool:
    """One adapter per slot, module `m` of slot `s` of rank `slot_ranks[s].get(m, 0)`.

    Weights are N(0, 1/in) for A and N(0, 1/r) for B so that h and the LoRA delta are O(1) for any
    shape; scales are 1.0 unless `random_scales` (then U[0.5, 2)). `generator` must live on `device`.
    """
    if spare_blocks < 1:
        raise ValueError("spare_blocks must be >= 1: one NaN block backs the unused table entries")
    num_slots = len(slot_ranks)
    layouts = [plan_layout(r, dims, page_elems) for r in slot_ranks]
    for s, lay in enumerate(layouts):
        for m, pl in lay.modules.items():
            if pl.rank > max_rank:
                raise ValueError(f"slot {s} {m}: rank {pl.rank} exceeds max_rank {max_rank}")
    used_blocks = sum(lay.num_pages for lay in layouts)
    total_blocks = used_blocks + spare_blocks
    order = torch.randperm(total_blocks, generator=generator, device=device).cpu()
    pool = torch.full((total_blocks, page_elems), float("nan"), dtype=dtype, device=device)
    poison = int(order[used_blocks]) * page_elems
    a_addr = torch.full((num_slots, len(MODULES), max_rank), poison, dtype=torch.int64)
    b_addr = torch.full_like(a_addr, poison)
    ranks = torch.zeros((num_slots, len(MODULES)), dtype=torch.int32)
    scales = torch.ones((num_slots, len(MODULES)), dtype=torch.float32)
    if random_scales:
        scales = 0.5 + 1.5 * torch.rand(scales.shape, generator=generator, device=device).cpu()
    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    next_block = 0
    for s, lay in enumerate(layouts):
        block_ids = order[next_block:next_block + lay.num_pages]
        next_block += lay.num_pages
        slot_weights = {}
        for m, pl in lay.modules.items():
            a = torch.randn(pl.rank, pl.in_features, generator=generator, device=device) / pl.in_features ** 0.5
            b = torch.randn(pl.out_features, pl.rank, generator=generator, device=device) / pl.rank ** 0.5
            slot_weights[m] = (a.to(dtype), b.to(dtype))
            i = MODULE_INDEX[m]
            ranks[s, i] = pl.rank
            a_addr[s, i, :pl.rank] = physical_rows(pl.a_rows, block_ids, page_elems)
            b_addr[s, i, :pl.rank] = physical_rows(pl.b_rows, block_ids, page_elems)
        pages = torch.full((lay.num_pages, page_elems), float("nan"), dtype=dtype, device=device)
        pack_layer(lay, slot_weights, pages)
        pool[block_ids.to(device)] = pages
        weights.append(slot_weights)
    return SyntheticPool(pool=pool.view(-1), a_addr=a_addr.to(device), b_addr=b_addr.to(device),
                         ranks=ranks.to(device), scales=scales.to(device), weights=weights,
                         page_elems=page_elems)
