"""Random compressed adapters (cores) in a layer page pool, with their tables and bases, for the
tests and benchmarks of `kernels/compressed_lora.py`.

Placed through the real core layout (`slora_plugin/core_layout.py`) with shuffled block ids, so each
kernel test also checks the layout contract. Everything in the pool that is not a core row is NaN
and every unused table entry points at a NaN page: a kernel that reads a wrong address produces NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from slora_plugin.core_layout import pack_cores, plan_cores
from slora_plugin.kernels.compressed_lora import CompressedBases
from slora_plugin.layout import MODULE_INDEX, MODULES, physical_rows


@dataclass
class SyntheticCores:
    """A layer pool holding one compressed adapter per slot, and the op's tables and bases."""

    pool: torch.Tensor          # 1-D
    core_addr: torch.Tensor     # int64 [S, 7, K] (or [S, 7, 1] diagonal)
    has_core: torch.Tensor      # int32 [S, 7]
    slot_group: torch.Tensor    # int32 [S]
    bases: dict[str, CompressedBases]   # module -> bases of every cluster


def build_synthetic_cores(module_io: Mapping[str, tuple[int, int]], slot_modules: Sequence[Sequence[str]],
                          slot_groups: Sequence[int], num_groups: int, rank: int, diagonal: bool, page_elems: int,
                          dtype: torch.dtype, device: torch.device | str,
                          generator: torch.Generator | None = None) -> SyntheticCores:
    """Slot s holds cores for the modules `slot_modules[s]`, cluster `slot_groups[s]`; every module
    of `module_io` (module -> (d_in, d_out)) gets random orthonormal bases per cluster. Cores are
    N(0, 1) (diagonal or full), so the LoRA delta is O(|x|)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    bases = {}
    for m, (d_in, d_out) in module_io.items():
        us = [torch.linalg.qr(randn(d_out, rank)).Q.to(dtype) for _ in range(num_groups)]
        vs = [torch.linalg.qr(randn(d_in, rank)).Q.to(dtype) for _ in range(num_groups)]
        b = CompressedBases.from_clusters(us, vs)
        bases[m] = CompressedBases(b.v_cat.to(device), b.ut_cat.to(device), rank)
    layouts = [plan_cores(mods, rank, diagonal, page_elems) for mods in slot_modules]
    used = sum(lay.num_pages for lay in layouts)
    order = torch.randperm(used + 1, generator=generator)
    pool = torch.full((used + 1, page_elems), float("nan"), dtype=dtype)
    rows = 1 if diagonal else rank
    core_addr = torch.full((len(slot_modules), len(MODULES), rows), int(order[used]) * page_elems, dtype=torch.int64)
    has_core = torch.zeros((len(slot_modules), len(MODULES)), dtype=torch.int32)
    first = 0
    for s, lay in enumerate(layouts):
        blocks = order[first:first + lay.num_pages]
        first += lay.num_pages
        cores = {m: randn(rank) if diagonal else randn(rank, rank) for m in lay.rows}
        pages = torch.full((lay.num_pages, page_elems), float("nan"), dtype=dtype)
        pack_cores(lay, cores, pages)
        pool[blocks] = pages
        for m, offsets in lay.rows.items():
            core_addr[s, MODULE_INDEX[m]] = physical_rows(offsets, blocks, page_elems)
            has_core[s, MODULE_INDEX[m]] = 1
    return SyntheticCores(pool.view(-1).to(device), core_addr.to(device), has_core.to(device),
                          torch.tensor(list(slot_groups), dtype=torch.int32, device=device), bases)
