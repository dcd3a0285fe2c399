"""Per-slot row-address tables: what the paged kernels read to find an adapter's weights.

vLLM's LoRA machinery still thinks in *slots* (`max_loras` adapters per step); the kernels
index these tables by slot. Activating an adapter in a slot writes one row of each table
(no weight copy: the weights already sit in the adapter's KV pages). The addresses are element
offsets into a layer's pool viewed flat, and are the same in every layer (`layout.py`), so one
set of tables serves the whole model.

All four tables are allocated once, at a fixed address, so CUDA graphs captured with them stay
valid; rows are only ever overwritten in place.

Compressed adapters (`kernels/compressed_lora.py`) have their own three tables, `CoreTables`,
allocated beside these (`SlotTables.enable_cores`, before any graph is captured) only when the
engine serves compressed collections: a slot then holds either kind -- writing a plain adapter's
rows gives the slot no cores, writing a compressed adapter's cores gives it rank 0 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from slora_plugin.core_layout import CoreLayout
from slora_plugin.layout import MODULE_INDEX, MODULES, PageLayout, physical_rows


@dataclass(frozen=True)
class SlotRows:
    """One slot's rows, built on the host: a_addr/b_addr (M, R) int64, ranks (M,) int32,
    scales (M,) float32."""

    a_addr: torch.Tensor
    b_addr: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor


def slot_rows(layout: PageLayout, block_ids: Sequence[int], max_rank: int) -> SlotRows:
    """The rows of an adapter laid out by `layout` and resident in KV blocks `block_ids`.

    PEFT scaling is folded into B when packing, so every present module's scale is 1.0.
    Unused entries (ranks beyond a module's rank, absent modules) are address 0 with rank 0:
    the kernels never read them.
    """
    if len(block_ids) != layout.num_pages:
        raise ValueError(f"the adapter needs {layout.num_pages} pages but got {len(block_ids)} "
                         f"block ids {list(block_ids)}")
    m = len(MODULES)
    a = torch.zeros(m, max_rank, dtype=torch.int64)
    b = torch.zeros(m, max_rank, dtype=torch.int64)
    ranks = torch.zeros(m, dtype=torch.int32)
    scales = torch.zeros(m, dtype=torch.float32)
    for name, pl in layout.modules.items():
        if pl.rank > max_rank:
            raise ValueError(f"module {name} has rank {pl.rank}, above the plugin's "
                             f"max_lora_rank {max_rank}")
        i = MODULE_INDEX[name]
        a[i, :pl.rank] = physical_rows(pl.a_rows, block_ids, layout.page_elems)
        b[i, :pl.rank] = physical_rows(pl.b_rows, block_ids, layout.page_elems)
        ranks[i] = pl.rank
        scales[i] = 1.0
    return SlotRows(a, b, ranks, scales)


@dataclass(frozen=True)
class CoreRows:
    """One slot's core rows, built on the host: core_addr (M, K) int64 ((M, 1) diagonal),
    has_core (M,) int32, and the slot's cluster column group (index into the resident bases)."""

    core_addr: torch.Tensor
    has_core: torch.Tensor
    group: int


def core_rows(layout: CoreLayout, block_ids: Sequence[int], group: int) -> CoreRows:
    """The rows of a compressed adapter whose cores (`core_layout.plan_cores`) sit in KV blocks
    `block_ids`, of resident cluster `group`. Modules it does not adapt: address 0, no core."""
    if len(block_ids) != layout.num_pages:
        raise ValueError(f"the adapter needs {layout.num_pages} pages but got {len(block_ids)} "
                         f"block ids {list(block_ids)}")
    addr = torch.zeros(len(MODULES), 1 if layout.diagonal else layout.rank, dtype=torch.int64)
    has = torch.zeros(len(MODULES), dtype=torch.int32)
    for name, offsets in layout.rows.items():
        addr[MODULE_INDEX[name]] = physical_rows(offsets, block_ids, layout.page_elems)
        has[MODULE_INDEX[name]] = 1
    return CoreRows(addr, has, group)


class CoreTables:
    """The compressed op's per-slot tables at fixed addresses: `core_addr[S, M, K]` int64
    (`[S, M, 1]` for diagonal cores), `has_core[S, M]` int32, `slot_group[S]` int32. A cleared
    slot has no core for any module: the op reads and adds nothing for its tokens."""

    def __init__(self, num_slots: int, rank: int, diagonal: bool, device: torch.device | str) -> None:
        self.rank, self.diagonal = rank, diagonal
        m = len(MODULES)
        self.core_addr = torch.zeros(num_slots, m, 1 if diagonal else rank, dtype=torch.int64,
                                     device=device)
        self.has_core = torch.zeros(num_slots, m, dtype=torch.int32, device=device)
        self.slot_group = torch.zeros(num_slots, dtype=torch.int32, device=device)

    def write(self, slot: int, rows: CoreRows) -> None:
        """Asynchronous copies into the fixed tensors, as `SlotTables.write`."""
        if tuple(rows.core_addr.shape) != tuple(self.core_addr.shape[1:]):
            raise ValueError(f"core rows of shape {tuple(rows.core_addr.shape)} do not fit tables of "
                             f"rank {self.rank} (diagonal {self.diagonal})")
        self.core_addr[slot].copy_(rows.core_addr, non_blocking=True)
        self.has_core[slot].copy_(rows.has_core, non_blocking=True)
        self.slot_group[slot].fill_(rows.group)

    def clear(self, slot: int) -> None:
        self.has_core[slot].zero_()
        self.core_addr[slot].zero_()
        self.slot_group[slot].zero_()

    def clear_all(self) -> None:
        for t in (self.core_addr, self.has_core, self.slot_group):
            t.zero_()


class SlotTables:
    """The kernels' per-slot tables, as fixed-address tensors on `device`.

    `a_addr[S, M, R]`, `b_addr[S, M, R]` int64, `ranks[S, M]` int32, `scales[S, M]` float32,
    with S = slots, M = len(MODULES), R = max_rank. A cleared slot has rank 0 everywhere, so
    a token mapped to it (vLLM's warm-up "dummy" adapters) adds nothing and reads nothing.
    """

    def __init__(self, num_slots: int, max_rank: int, device: torch.device | str) -> None:
        if num_slots <= 0 or max_rank <= 0:
            raise ValueError(f"need num_slots > 0 and max_rank > 0, got {num_slots}, {max_rank}")
        m = len(MODULES)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.a_addr = torch.zeros(num_slots, m, max_rank, dtype=torch.int64, device=device)
        self.b_addr = torch.zeros(num_slots, m, max_rank, dtype=torch.int64, device=device)
        self.ranks = torch.zeros(num_slots, m, dtype=torch.int32, device=device)
        self.scales = torch.zeros(num_slots, m, dtype=torch.float32, device=device)
        self.device = torch.device(device)
        #: The compressed adapters' tables, None unless `enable_cores` was called.
        self.cores: CoreTables | None = None

    def enable_cores(self, rank: int, diagonal: bool) -> CoreTables:
        """Allocate the core tables (once, before CUDA graphs are captured: their addresses
        are baked into the graphs), for compressed collections of rank `rank`."""
        if self.cores is not None:
            if (self.cores.rank, self.cores.diagonal) != (rank, diagonal):
                raise ValueError(f"core tables exist for rank {self.cores.rank} (diagonal "
                                 f"{self.cores.diagonal}), not {rank} ({diagonal})")
            return self.cores
        self.cores = CoreTables(self.num_slots, rank, diagonal, self.device)
        return self.cores

    def write_cores(self, slot: int, rows: CoreRows) -> None:
        """Point `slot` at a compressed adapter's cores; its paged rows are cleared (rank 0)."""
        self._check(slot)
        if self.cores is None:
            raise ValueError("a compressed adapter in a slot, but the core tables were never enabled")
        self._clear_paged(slot)
        self.cores.write(slot, rows)

    def write(self, slot: int, rows: SlotRows) -> None:
        """Point `slot` at an adapter's rows (stream-ordered copies into the fixed tensors).

        Asynchronous copies: from pageable host memory CUDA stages the source before
        `cudaMemcpyAsync` returns (so the host rows may be freed at once) and does not wait for
        the device, where a blocking copy first waits for the stream to drain, i.e. for the
        previous step that async scheduling is still running. Stream order still puts the new
        rows before this step's kernels."""
        self._check(slot)
        self.a_addr[slot].copy_(rows.a_addr, non_blocking=True)
        self.b_addr[slot].copy_(rows.b_addr, non_blocking=True)
        self.ranks[slot].copy_(rows.ranks, non_blocking=True)
        self.scales[slot].copy_(rows.scales, non_blocking=True)
        if self.cores is not None:
            self.cores.clear(slot)

    def clear(self, slot: int) -> None:
        """Make `slot` a no-op adapter (rank 0 for every module, no cores)."""
        self._check(slot)
        self._clear_paged(slot)
        if self.cores is not None:
            self.cores.clear(slot)

    def _clear_paged(self, slot: int) -> None:
        self.ranks[slot].zero_()
        self.scales[slot].zero_()
        self.a_addr[slot].zero_()
        self.b_addr[slot].zero_()

    def clear_all(self) -> None:
        for t in (self.a_addr, self.b_addr, self.ranks, self.scales):
            t.zero_()
        if self.cores is not None:
            self.cores.clear_all()

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
