"""What the shrink and expand kernels share: the per-step segment metadata (`SegmentMeta`), the
Triton helpers both kernels run over its work items and task counters, and the argument checks
both launchers make.

Decode is memory-bound on the adapter weights, so tokens are grouped by slot into *segments* on
the device (`SegmentMeta.update`, once per engine step, shared by all layers) and each
(segment, token tile) is one *work item*: every distinct adapter's rows are read once per tile,
not once per token. The work list has a static upper bound (`SegmentMeta.work_bound`), so every
grid depends only on the padded token count and static configuration. The kernels are persistent:
one wave of programs (`shrink_programs_per_sm` / `expand_programs_per_sm` per SM) loops over the
tasks of the real work items, whose number `SegmentMeta.update` leaves in a device scalar, so a
step with few (or no) adapter tokens does not pay for the worst-case grid (v2 started every task of
the bound: +1.2 ms per Llama-2-7B decode step at 256 sequences without any adapter); the K split
of the shrink is chosen from that number on the device too (`KernelConfig.split_for`). Tasks are
handed out dynamically: each program draws its next task index from a device counter
(`SegmentMeta.sched`, `tl.atomic_add`), so a program that drew a rank-128 adapter's live tiles
does not hold back a fixed share of later tasks while others, which drew dead tiles of rank-8
adapters, idle (v3's static round robin: 256 x 256 mixed ranks 390 us against v2's 349 with the
hardware scheduler); the last program to finish resets the counter (`_sched_done`), so no memset
runs per call. Nothing in the per-step path synchronises with the host, so the launches can be
captured in CUDA graphs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.kernels.tiling import TILE_M
from slora_plugin.layout import MODULES

#: `SegmentMeta.sched` entries (next task, programs done) of each kernel. One pair would do (the
#: two kernels of a stream never overlap: expand reads what shrink wrote), but a pair each keeps
#: the protocol independent of launch order for 8 bytes.
SHRINK_COUNTERS = slice(0, 2)
EXPAND_COUNTERS = slice(2, 4)
#: At most this many slices per call (qkv_proj has 3).
MAX_SLICES = 3
_ACT_DTYPES = (torch.float16, torch.bfloat16)


class SegmentMeta:
    """Per-step metadata in fixed-address device buffers, shared by every layer of one step.

    After `update(token_slot)`:
      - `sorted_tokens[:T]`: token indices grouped by slot (stable);
      - `work[bm]` int32 [3, work_bound(max_tokens, bm)]: rows (slot, first position in
        `sorted_tokens`, token count) of each work item, count 0 past the real items;
      - `work_count[bm]` int32 [1]: the number of real work items (they come first, each with
        count >= 1). The kernels' grids are sized by the static bound, but their programs loop
        over the real items only, so a step without adapters costs one small launch per kernel.
    And always: `sched` int32 [4], the kernels' task counters (`SHRINK_COUNTERS`, `EXPAND_COUNTERS`),
    zero whenever no kernel is running.
    Slots outside [0, max_slots) are treated as -1 (no adapter): the check would need a host sync,
    and this way a bad slot can never index past the tables.
    """

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str) -> None:
        if max_tokens < 1 or max_slots < 1:
            raise ValueError(f"SegmentMeta needs max_tokens >= 1 and max_slots >= 1, got {max_tokens}, {max_slots}")
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.max_segments = min(max_tokens, max_slots)
        self.num_tokens = 0  # T of the last update, for host-side shape checks only
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.sorted_tokens = torch.zeros(max_tokens, **i32)
        self.device = self.sorted_tokens.device  # "cuda" resolved to "cuda:<current>" for comparisons
        # one extra trailing entry: the scatter target of tokens that do not start a segment
        self.seg_slot = torch.zeros(self.max_segments + 1, **i64)
        self.seg_start = torch.zeros(self.max_segments + 1, **i64)
        self.seg_len = torch.zeros(self.max_segments + 1, **i64)
        self.work = {bm: torch.zeros((3, self.work_bound(max_tokens, bm)), **i32) for bm in TILE_M}
        self.work_count = {bm: torch.zeros(1, **i32) for bm in TILE_M}
        # task counters of the kernels' dynamic scheduling, zero between launches (`_sched_done`);
        # one stream at a time: two launches in flight on one SegmentMeta would share them
        self.sched = torch.zeros(4, **i32)
        self._positions = torch.arange(max_tokens, **i64)
        self._work_index = {bm: torch.arange(self.work_bound(max_tokens, bm), **i64) for bm in TILE_M}

    def work_bound(self, num_tokens: int, block_m: int) -> int:
        """Static upper bound on the work items of `num_tokens` tokens in tiles of `block_m`:
        sum over segments of ceil(len / bm) <= T / bm + (number of segments)."""
        return triton.cdiv(num_tokens, block_m) + min(num_tokens, self.max_segments)

    def update(self, token_slot: torch.Tensor) -> None:
        """Group the step's tokens by slot. Device ops only, fixed shapes for a given T."""
        if token_slot.dim() != 1 or token_slot.dtype != torch.int32:
            raise ValueError(f"token_slot must be a 1-D int32 tensor, got {token_slot.dtype} {tuple(token_slot.shape)}")
        if token_slot.device != self.device:
            raise ValueError(f"token_slot is on {token_slot.device}, SegmentMeta on {self.device}")
        t = token_slot.numel()
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens exceed SegmentMeta.max_tokens={self.max_tokens}")
        self.num_tokens = t
        num_slots, trash = self.max_slots, self.max_segments
        slot = token_slot.to(torch.int64)
        key = torch.where((slot >= 0) & (slot < num_slots), slot, num_slots)
        skey, order = torch.sort(key, stable=True)
        self.sorted_tokens[:t].copy_(order)
        valid = skey < num_slots
        is_start = valid.clone()
        is_start[1:] &= skey[1:] != skey[:-1]
        seg_idx = torch.cumsum(is_start, 0) - 1
        dst = torch.where(is_start, seg_idx, trash)
        self.seg_start.zero_().scatter_(0, dst, self._positions[:t])
        self.seg_slot.zero_().scatter_(0, dst, skey)
        self.seg_len.zero_().scatter_add_(0, torch.where(valid, seg_idx, trash), valid.to(torch.int64))
        lens = self.seg_len[:trash]
        for bm, work in self.work.items():
            tiles = (lens + bm - 1) // bm
            ends = torch.cumsum(tiles, 0)
            w = self._work_index[bm]
            seg = torch.searchsorted(ends, w, right=True)
            live = seg < trash
            seg.clamp_(max=trash - 1)
            tile = w - (ends[seg] - tiles[seg])
            work[0].copy_(torch.where(live, self.seg_slot[seg], 0))
            work[1].copy_(self.seg_start[seg] + tile * bm)
            work[2].copy_(torch.where(live, (self.seg_len[seg] - tile * bm).clamp(0, bm), 0))
            self.work_count[bm].copy_(ends[-1:])


@triton.jit
def _sched_done(sched_ptr):
    """End of a program's task loop (its last draw from the task counter `sched_ptr[0]` was past the
    end): count it in `sched_ptr[1]`; the last program to finish resets both counters to 0, so the
    next launch on the stream (or the next replay of a CUDA graph) starts from 0 with no memset.
    Every program draws from `sched_ptr[0]` before it counts itself done (acq_rel atomics), so
    nothing draws after the reset."""
    if tl.atomic_add(sched_ptr + 1, 1) == tl.num_programs(0) - 1:
        tl.atomic_xchg(sched_ptr, 0)
        tl.atomic_xchg(sched_ptr + 1, 0)


@triton.jit
def _split_for(n_work, split_k, small_split_k, small_items):
    """`KernelConfig.split_for` on the device (both kernels compute the same split)."""
    s = (small_split_k * small_items) // tl.maximum(n_work, 1)
    return tl.maximum(split_k, tl.minimum(small_split_k, s))


@triton.jit
def _work_tokens(work_ptr, work_stride, sorted_ptr, w, BLOCK_M: tl.constexpr):
    """Work item `w`'s tokens (rows of x / y) and which of the BLOCK_M lanes hold one."""
    n_tok = tl.load(work_ptr + 2 * work_stride + w)
    start = tl.load(work_ptr + work_stride + w)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tok
    tok = tl.load(sorted_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    return tok, m_mask


@triton.jit
def _item_rank(work_ptr, ranks_ptr, w, sl, m0, m1, m2, stride_rs, max_rank):
    """Work item `w`'s slot, the module id of slice `sl` and the adapter's rank there."""
    slot = tl.load(work_ptr + w).to(tl.int64)
    m = tl.where(sl == 0, m0, tl.where(sl == 1, m1, m2))
    r = tl.minimum(tl.load(ranks_ptr + slot * stride_rs + m), max_rank)
    return slot, m, r


def _check_tables(name: str, addr: torch.Tensor, ranks: torch.Tensor, meta: SegmentMeta,
                  max_rank: int, device: torch.device) -> None:
    if addr.dtype != torch.int64 or addr.dim() != 3 or addr.shape[1] != len(MODULES) or addr.stride(2) != 1:
        raise ValueError(f"{name} must be int64 [S, {len(MODULES)}, R] with unit row stride, "
                         f"got {addr.dtype} {tuple(addr.shape)}")
    if addr.shape[0] < meta.max_slots:
        raise ValueError(f"{name} has {addr.shape[0]} slots, fewer than SegmentMeta.max_slots={meta.max_slots}")
    if not 1 <= max_rank <= addr.shape[2]:
        raise ValueError(f"max_rank must be in 1..{addr.shape[2]} (the rows of {name}), got {max_rank}")
    if ranks.dtype != torch.int32 or ranks.shape != addr.shape[:2] or not ranks.is_contiguous():
        raise ValueError(f"ranks must be contiguous int32 {tuple(addr.shape[:2])}, "
                         f"got {ranks.dtype} {tuple(ranks.shape)}")
    for t_name, t in ((name, addr), ("ranks", ranks), ("SegmentMeta", meta.sorted_tokens)):
        if t.device != device:
            raise ValueError(f"{t_name} is on {t.device}, the activations on {device}")


def _check_modules(module_ids: Sequence[int]) -> None:
    if not 1 <= len(module_ids) <= MAX_SLICES:
        raise ValueError(f"1..{MAX_SLICES} module ids per call, got {tuple(module_ids)}")
    if any(not 0 <= m < len(MODULES) for m in module_ids):
        raise ValueError(f"module ids must index layout.MODULES (0..{len(MODULES) - 1}), got {tuple(module_ids)}")


def _check_slices(y: torch.Tensor, module_ids: Sequence[int], slice_widths: Sequence[int]) -> None:
    if len(slice_widths) != len(module_ids) or any(w < 1 for w in slice_widths):
        raise ValueError(f"slice_widths {tuple(slice_widths)} must be positive, one per module id {tuple(module_ids)}")
    if y.dim() != 2 or y.shape[1] != sum(slice_widths):
        raise ValueError(f"y must be [T, {sum(slice_widths)}] (sum of slice_widths), got {tuple(y.shape)}")


def _check_pool(pool: torch.Tensor, act: torch.Tensor) -> None:
    if act.dtype not in _ACT_DTYPES:
        raise ValueError(f"activations must be float16 or bfloat16, got {act.dtype}")
    if pool.dim() != 1 or pool.dtype != act.dtype or pool.device != act.device:
        raise ValueError(f"pool must be a 1-D {act.dtype} tensor on {act.device}, got {pool.dtype} "
                         f"{tuple(pool.shape)} on {pool.device}")


def _pad3(values: Sequence[int], fill: int) -> list[int]:
    return list(values) + [fill] * (MAX_SLICES - len(values))


def _check_tokens(t: int, meta: SegmentMeta) -> None:
    if t > meta.max_tokens:
        raise ValueError(f"{t} tokens exceed SegmentMeta.max_tokens={meta.max_tokens}")
    if t < meta.num_tokens:
        raise ValueError(f"the activations have {t} rows but SegmentMeta.update was given {meta.num_tokens} tokens")
