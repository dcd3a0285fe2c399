"""Triton kernels that apply a different LoRA adapter (and rank) per token, reading the weights
through row-address tables out of a layer's KV page pool (S-LoRA / Punica design).

Two launches per layer, `shrink` then `expand`:

- shrink: h[t, i, :r] = x[t] @ A_{s,m_i}^T            (fp32 accumulation, K optionally split)
- expand: y[t, off_i:off_i+w_i] += scale * h[t, i, :r] @ B_{s,m_i}^T

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

The prefill and decode variants are the same kernels with different tiles (`decode_config`,
`prefill_config`, picked from the static token count by `choose_config`): decode uses 16-token
tiles, small rank tiles and a split K so that few segments still fill the GPU; prefill uses
64-token tiles and larger rank tiles for reuse of A/B across tokens. A config depends on the
phase, in_features and max_rank only, and the arguments that differ between layers or token
counts are not specialized (`_SHRINK_DYNAMIC`, `_EXPAND_DYNAMIC`), so a model compiles each
kernel once per phase: vLLM's CUDA-graph capture at every batch size triggers no compile after
the first (`launch_plans` exposes the exact launch arguments; tests/kernels count the keys).

`triton` is imported directly: vLLM swaps it for placeholders when no GPU driver is active, and
the kernels must also run under TRITON_INTERPRET=1 on CPU tensors (where a bf16 `tl.dot` is
not supported, so bf16 tiles are upcast there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.layout import MODULES

#: `SegmentMeta.sched` entries (next task, programs done) of each kernel. One pair would do (the
#: two kernels of a stream never overlap: expand reads what shrink wrote), but a pair each keeps
#: the protocol independent of launch order for 8 bytes.
SHRINK_COUNTERS = slice(0, 2)
EXPAND_COUNTERS = slice(2, 4)
#: Token tile sizes for which `SegmentMeta` builds a work list (a config's `block_m` is one of them).
TILE_M: tuple[int, ...] = (16, 64)
#: At most this many slices per call (qkv_proj has 3).
MAX_SLICES = 3
_ACT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one call; tuning knobs, none of them changes the result beyond rounding."""

    block_m: int      # tokens per work item (one of TILE_M)
    split_k: int      # shrink: K split across programs (partial h summed by expand)
    block_r: int      # shrink: rank rows per program
    block_k: int      # shrink: K elements per loop step
    block_n: int      # expand: output columns per program
    block_kr: int     # expand: rank rows per loop step
    num_warps: int = 4
    num_stages: int = 3  # software-pipeline depth of the K / rank loops (Triton's default)
    # persistent grids: at most this many programs per SM loop over the tasks; one wave at the
    # kernel's occupancy (registers, ptxas -v), so no program waits for a slot behind a whole loop
    shrink_programs_per_sm: int = 4
    expand_programs_per_sm: int = 4
    small_items: int = 0      # with few real work items, split K up to `small_split_k` (see split_for)
    small_split_k: int = 1

    @property
    def max_split(self) -> int:
        """First dimension of the h buffer: the largest split `split_for` can return."""
        return self.small_split_k if self.small_items else self.split_k

    def split_for(self, num_work: int) -> int:
        """The K split of a step with `num_work` real work items, as both kernels compute it on the
        device from `SegmentMeta.work_count` (`_split_for`): few items (a few tokens) have few
        tasks, so each shrink task must be short for the loads to be in flight at once:
        small_split_k * small_items // num_work, clamped to [split_k, small_split_k]."""
        if not self.small_items:
            return self.split_k
        return max(self.split_k, min(self.small_split_k, self.small_split_k * self.small_items // max(num_work, 1)))

    def __post_init__(self) -> None:
        if self.block_m not in TILE_M:
            raise ValueError(f"block_m must be one of {TILE_M}, got {self.block_m}")
        for name in ("block_r", "block_k", "block_n", "block_kr"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.split_k < 1 or (self.small_items and self.small_split_k < self.split_k):
            raise ValueError(f"split_k must be >= 1 and small_split_k >= split_k, got {self.split_k}, "
                             f"{self.small_split_k}")
        if min(self.shrink_programs_per_sm, self.expand_programs_per_sm) < 1 or self.small_items < 0:
            raise ValueError(f"programs per SM must be >= 1 and small_items >= 0, got {self.shrink_programs_per_sm}, "
                             f"{self.expand_programs_per_sm}, {self.small_items}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps must be a power of two <= 16 and num_stages >= 1, got "
                             f"{self.num_warps}, {self.num_stages}")


#: Token counts up to this use the decode variant (vLLM captures CUDA graphs up to 512 tokens).
DECODE_MAX_TOKENS = 512


def decode_config(in_features: int, max_rank: int) -> KernelConfig:
    """Few tokens, many adapters (memory-bound on the weights): 16-token tiles, 16-row rank tiles
    (a rank-8 adapter wastes little and a rank-128 one gets 8 tasks per K split), K split in 2 from
    128 work items on.

    H100 sweep (Llama-2-7B qkv, 256 tokens x 256 adapters, kernels/NOTES.md): split 2 instead of 4
    took expand from 197 to 163 us (half the h partials to gather per rank step) for +3% in shrink;
    expand tiles of 256 columns instead of 128 took it to 171 us (twice the B bytes per program, so
    the dependent table loads at a program's start are paid half as often).

    With very few real work items that starves the GPU: one adapter has 2 tasks per rank tile,
    each a 16-step K loop (v2, qkv r16: shrink 21 us at 1 token; v1 with split 16: 9 us). So the
    split grows as the items get fewer: clamp(32 // items, 2, 16) (`split_for`, chosen on the device
    per step: no compile, no host sync): 16 at 1-2 items, 8 at 4, 4 at 8, 2 from 16 on. No more:
    any split but 2 sums its partials in the expand's runtime loop, and the v3 sweep
    (2026-11-23, rule 256 // items) measured split 2 faster at 16 x 16 mixed (54 vs 67 us at
    split 16) and in the expand at 64 x 64 mixed (51.7 vs 67 us at split 4).

    Programs per SM: shrink 93 registers -> 5, expand 124 -> 4 (4 warps, sm_90a, ptxas -v; the
    dynamic task loop took the shrink from 80 registers, 6 per SM).
    """
    return KernelConfig(block_m=16, split_k=2, block_r=16, block_k=128, block_n=256, block_kr=16,
                        shrink_programs_per_sm=5, expand_programs_per_sm=4, small_items=2, small_split_k=16)


def prefill_config(in_features: int, max_rank: int) -> KernelConfig:
    """Long segments: 64-token tiles so each A/B tile is reused across tokens, rank tiles of 32
    (up to max_rank), 128-wide K steps, 4 warps.

    H100 sweep (4,096 tokens, 16 adapters of ranks 8..128): shrink 237 us with rank tiles of 128,
    K steps of 64 and 8 warps; 122 us with rank tiles of 64 (half the zero rows fed to the MMA for
    ranks <= 64, twice the programs), 126 with K steps of 128, 174 with 4 warps; expand 264 -> 229
    us with 4 warps. Second sweep (v2, 2026-11-23): rank tiles of 32 instead of 64 took the shrink
    from 140 to 88 us at 4,096 x 16 mixed and from 59 to 49 us at 4,096 x 1 rank 16 (K steps of
    64: 98; 8 warps: 104). Programs per SM: shrink 231 registers -> 2, expand 218 -> 2 (the
    dynamic task loop took it from 168 registers, 3 per SM: in the v3 sweep 2 per SM cost the
    expand 215 -> 237 us at 4,096 x 16 mixed).
    """
    block_r = min(32, max(16, triton.next_power_of_2(max_rank)))
    return KernelConfig(block_m=64, split_k=1, block_r=block_r, block_k=128, block_n=128, block_kr=32,
                        num_warps=4, shrink_programs_per_sm=2, expand_programs_per_sm=2)


def choose_config(num_tokens: int, in_features: int, max_rank: int) -> KernelConfig:
    """The variant for a (padded, hence static) token count: one per phase and layer shape, never
    a function of the token count within a phase, so that capturing CUDA graphs at every batch
    size compiles each kernel once per phase (see `launch_plans`)."""
    if num_tokens <= DECODE_MAX_TOKENS:
        return decode_config(in_features, max_rank)
    return prefill_config(in_features, max_rank)


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


# Row addresses that are multiples of 8 elements (16 bytes) allow 16-byte vector loads. Real
# models' rows all are (page and feature sizes are multiples of 8), but nothing in the contract
# promises it, so each program checks its rows on the device and falls back to element loads.


@triton.jit
def _shrink_acc(x_ptr, pool_ptr, tok, m_mask, rows, r_mask, k_lo, k_hi, stride_xm, stride_xk,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr):
    """x[tok, k_lo:k_hi] @ A[rows, k_lo:k_hi]^T in fp32."""
    if ALIGNED:
        rows = tl.multiple_of(rows, 8)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        x_ptrs = x_ptr + tok[:, None] * stride_xm + kk[None, :] * stride_xk
        a_ptrs = pool_ptr + rows[:, None] + kk[None, :]
        if EVEN_K:  # every K tile is whole: masks constant along K, so loads vectorise
            xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
        else:
            k_mask = kk < k_hi
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)))
        else:
            acc += tl.dot(xt, tl.trans(at))
    return acc


#: Integer arguments Triton must not specialize on (value 1, multiple of 16): they differ between
#: layers (module ids, tile counts) or with the token count (`stride_hs`), and each new
#: specialization is a JIT compile, during vLLM's CUDA-graph capture. The ones left specialized
#: (x/y/table strides, slice widths) are the same at every token count and keep
#: the alignment facts the 16-byte vector loads and stores rely on.
_SHRINK_DYNAMIC = ("work_stride", "m0", "m1", "m2", "K", "max_rank", "split_k", "small_split_k", "small_items",
                   "num_slices", "num_rank_tiles", "stride_hs")
_EXPAND_DYNAMIC = ("work_stride", "m0", "m1", "m2", "max_rank", "n_tiles", "split_k", "small_split_k", "small_items",
                   "stride_hs")


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


@triton.jit(do_not_specialize=_SHRINK_DYNAMIC)
def _shrink_kernel(x_ptr, pool_ptr, h_ptr, work_ptr, work_stride, count_ptr, sched_ptr, sorted_ptr, a_addr_ptr,
                   ranks_ptr, m0, m1, m2, K, max_rank, split_k, small_split_k, small_items, num_slices, num_rank_tiles,
                   stride_xm, stride_xk, stride_as, stride_am, stride_rs,
                   stride_hs, stride_ht, stride_hi,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """Persistent: each program loops over the tasks (work item; slice, rank tile, K split) ->
    h[split, tokens, slice, rank tile], drawing each next task index from `sched_ptr[0]`.

    The work item varies slowest and indices are drawn in order, so the programs running together
    share its x rows (L2 reuse).
    `inner` = slices * num_rank_tiles * split tasks per work item; only the `count_ptr` real work
    items have tasks, and a rank tile past the adapter's rank costs two cached loads. The split
    depends on the number of real items (`_split_for`); a split past K's end stores zeros.
    """
    n_work = tl.load(count_ptr)
    split = _split_for(n_work, split_k, small_split_k, small_items)
    k_per_split = tl.cdiv(tl.cdiv(K, split), BLOCK_K) * BLOCK_K  # whole K steps: EVEN_K holds per split
    inner = num_slices * num_rank_tiles * split
    total = n_work * inner
    task = tl.atomic_add(sched_ptr, 1)
    while task < total:
        w = task // inner
        j = task % inner
        sl = j // (num_rank_tiles * split)
        r0 = ((j // split) % num_rank_tiles) * BLOCK_R
        sp = j % split
        slot, m, r = _item_rank(work_ptr, ranks_ptr, w, sl, m0, m1, m2, stride_rs, max_rank)
        if r0 < r:
            tok, m_mask = _work_tokens(work_ptr, work_stride, sorted_ptr, w, BLOCK_M)
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < r
            rows = tl.load(a_addr_ptr + slot * stride_as + m * stride_am + offs_r, mask=r_mask, other=0)
            k_lo = sp * k_per_split
            k_hi = tl.minimum(k_lo + k_per_split, K)
            if tl.max(rows % 8, axis=0) == 0:
                acc = _shrink_acc(x_ptr, pool_ptr, tok, m_mask, rows, r_mask, k_lo, k_hi, stride_xm, stride_xk,
                                  BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K, True, UPCAST)
            else:
                acc = _shrink_acc(x_ptr, pool_ptr, tok, m_mask, rows, r_mask, k_lo, k_hi, stride_xm, stride_xk,
                                  BLOCK_M, BLOCK_R, BLOCK_K, EVEN_K, False, UPCAST)
            h_ptrs = h_ptr + sp * stride_hs + tok[:, None] * stride_ht + sl * stride_hi + offs_r[None, :]
            tl.store(h_ptrs, acc, mask=m_mask[:, None])
        task = tl.atomic_add(sched_ptr, 1)
    _sched_done(sched_ptr)


@triton.jit
def _expand_acc(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split_k,
                stride_hs, stride_ht, stride_hi,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                STATIC_SPLIT: tl.constexpr, EVEN_N: tl.constexpr, ALIGNED: tl.constexpr):
    """(sum over K splits of h[:, tok, sl, :r]) @ B^T[:r, offs_n] in fp32 (tf32 inputs).

    STATIC_SPLIT: the call's split is the config's SPLIT_K, summed unrolled (a nested loop would
    stop the pipelining of B); otherwise the `split_k` partials of a step with few work items, in a loop."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < r
        rows = tl.load(b_rows_ptr + kk, mask=k_mask, other=0)
        if ALIGNED:
            rows = tl.multiple_of(rows, 8)
        b_ptrs = pool_ptr + rows[:, None] + offs_n[None, :]
        if EVEN_N:  # masks constant along N, so loads vectorise
            bt = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0).to(tl.float32)
        else:
            bt = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        h_ptrs = h_ptr + tok[:, None] * stride_ht + sl * stride_hi + kk[None, :]
        h_mask = m_mask[:, None] & k_mask[None, :]
        hk = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if STATIC_SPLIT:
            for sp in tl.static_range(SPLIT_K):
                hk += tl.load(h_ptrs + sp * stride_hs, mask=h_mask, other=0.0)
        else:
            for sp in range(split_k):
                hk += tl.load(h_ptrs + sp * stride_hs, mask=h_mask, other=0.0)
        acc += tl.dot(hk, bt, input_precision="tf32")
    return acc


@triton.jit
def _expand_tile(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split_k,
                 stride_hs, stride_ht, stride_hi,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 STATIC_SPLIT: tl.constexpr, RANK_P2: tl.constexpr, EVEN_N: tl.constexpr):
    """`_expand_acc` with 16-byte B loads when every row address of the adapter is aligned."""
    offs_all = tl.arange(0, RANK_P2)
    all_rows = tl.load(b_rows_ptr + offs_all, mask=offs_all < r, other=0)
    if tl.max(all_rows % 8, axis=0) == 0:
        acc = _expand_acc(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split_k,
                          stride_hs, stride_ht, stride_hi, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, STATIC_SPLIT,
                          EVEN_N, True)
    else:
        acc = _expand_acc(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split_k,
                          stride_hs, stride_ht, stride_hi, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, STATIC_SPLIT,
                          EVEN_N, False)
    return acc


@triton.jit(do_not_specialize=_EXPAND_DYNAMIC)
def _expand_kernel(y_ptr, h_ptr, pool_ptr, work_ptr, work_stride, count_ptr, sched_ptr, sorted_ptr, b_addr_ptr,
                   ranks_ptr, scales_ptr, m0, m1, m2, w0, w1, w2, max_rank, n_tiles, split_k, small_split_k,
                   small_items, stride_ym, stride_yn, stride_bs, stride_bm, stride_rs,
                   stride_hs, stride_ht, stride_hi,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, SMALL_SPLIT: tl.constexpr, RANK_P2: tl.constexpr, EVEN_N: tl.constexpr):
    """Persistent: each program loops over the tasks (work item; output tile over all slices):
    y[tokens, tile] += scale * h @ B^T, drawing each next task index from `sched_ptr[0]`.

    The work item varies slowest: the programs running together read consecutive columns of the
    same B^T rows. Only the `count_ptr` real work items have tasks. SMALL_SPLIT: the config may
    split K otherwise than SPLIT_K (`_split_for`); the loop over a runtime split is compiled only
    then (it costs the prefill expand 60 registers, 3 -> 2 programs per SM).
    """
    n_work = tl.load(count_ptr)
    split = _split_for(n_work, split_k, small_split_k, small_items)
    total = n_work * n_tiles
    t0 = tl.cdiv(w0, BLOCK_N)
    t01 = t0 + tl.cdiv(w1, BLOCK_N)
    task = tl.atomic_add(sched_ptr, 1)
    while task < total:
        w = task // n_tiles
        nt = task % n_tiles
        sl = tl.where(nt < t0, 0, tl.where(nt < t01, 1, 2))
        slot, m, r = _item_rank(work_ptr, ranks_ptr, w, sl, m0, m1, m2, stride_rs, max_rank)
        if r > 0:
            width = tl.where(sl == 0, w0, tl.where(sl == 1, w1, w2))
            col0 = tl.where(sl == 0, 0, tl.where(sl == 1, w0, w0 + w1))
            n0 = (nt - tl.where(sl == 0, 0, tl.where(sl == 1, t0, t01))) * BLOCK_N
            tok, m_mask = _work_tokens(work_ptr, work_stride, sorted_ptr, w, BLOCK_M)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < width
            b_rows_ptr = b_addr_ptr + slot * stride_bs + m * stride_bm
            if SMALL_SPLIT and split != SPLIT_K:
                acc = _expand_tile(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split,
                                   stride_hs, stride_ht, stride_hi, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, False,
                                   RANK_P2, EVEN_N)
            else:
                acc = _expand_tile(h_ptr, pool_ptr, b_rows_ptr, tok, m_mask, sl, r, offs_n, n_mask, split,
                                   stride_hs, stride_ht, stride_hi, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, True,
                                   RANK_P2, EVEN_N)
            scale = tl.load(scales_ptr + slot * stride_rs + m)
            y_ptrs = y_ptr + tok[:, None] * stride_ym + (col0 + offs_n)[None, :] * stride_yn
            if EVEN_N:
                y_mask = m_mask[:, None]
            else:
                y_mask = m_mask[:, None] & n_mask[None, :]
            y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
            tl.store(y_ptrs, (y_old.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=y_mask)
        task = tl.atomic_add(sched_ptr, 1)
    _sched_done(sched_ptr)


def shrink_buffer(num_tokens: int, num_slices: int, max_rank: int, config: KernelConfig,
                  device: torch.device | str) -> torch.Tensor:
    """The fp32 h buffer [config.max_split, T, slices, max_rank rounded up to block_r] shrink writes.

    It needs no clearing: expand reads only (split, token, slice, rank) entries shrink wrote this
    call (the splits below the step's split, `_split_for`).
    """
    return torch.empty((config.max_split, num_tokens, num_slices, _padded_rank(max_rank, config)),
                       dtype=torch.float32, device=device)


#: Programs-per-SM unit of the persistent grids on CPU tensors (the interpreter): small, so the
#: tests' programs loop over several tasks. The interpreter runs programs one after another, so
#: there the first program draws every task and the others only the end of the counter.
CPU_SMS = 2
_SM_COUNTS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (queried once per GPU; `CPU_SMS` for CPU tensors)."""
    if device.type != "cuda":
        return CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _persistent_grid(num_tasks_bound: int, programs_per_sm: int, device: torch.device) -> tuple[int]:
    """At most `programs_per_sm` programs per SM, never more than the static bound on tasks: the
    grid depends on static things only (CUDA graphs); the programs loop over the real tasks."""
    return (max(1, min(num_tasks_bound, programs_per_sm * num_sms(device))),)


def _padded_rank(max_rank: int, config: KernelConfig) -> int:
    return triton.cdiv(max_rank, config.block_r) * config.block_r


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


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what the launchers run and what `launch_plans` reports, so tests can
    see exactly the arguments Triton specializes on without a GPU."""

    kernel: object
    grid: tuple[int]
    args: dict[str, object]        # runtime arguments, by name
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    dynamic: tuple[str, ...]       # the runtime arguments the kernel does not specialize on

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _shrink_launch(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                   a_addr: torch.Tensor, ranks: torch.Tensor, module_ids: Sequence[int],
                   max_rank: int, config: KernelConfig) -> Launch:
    t, k_in = x.shape
    _check_modules(module_ids)
    _check_pool(pool, x)
    _check_tables("a_addr", a_addr, ranks, meta, max_rank, x.device)
    _check_tokens(t, meta)
    padded = _padded_rank(max_rank, config)
    split = config.max_split
    if h.dtype != torch.float32 or h.dim() != 4 or h.shape[0] != split or h.shape[1] < t \
            or h.shape[2:] != (len(module_ids), padded) or h.stride(3) != 1 or h.device != x.device:
        raise ValueError(f"h must be fp32 [{split}, >={t}, {len(module_ids)}, {padded}] with unit last "
                         f"stride on {x.device} (see shrink_buffer), got {h.dtype} {tuple(h.shape)} on {h.device}")
    num_rank_tiles = padded // config.block_r
    work = meta.work[config.block_m]
    inner = len(module_ids) * num_rank_tiles * split  # tasks per work item at the largest split
    m0, m1, m2 = _pad3(module_ids, module_ids[0])
    args = dict(x_ptr=x, pool_ptr=pool, h_ptr=h, work_ptr=work, work_stride=work.stride(0),
                count_ptr=meta.work_count[config.block_m], sched_ptr=meta.sched[SHRINK_COUNTERS],
                sorted_ptr=meta.sorted_tokens, a_addr_ptr=a_addr, ranks_ptr=ranks, m0=m0, m1=m1, m2=m2, K=k_in,
                max_rank=max_rank, split_k=config.split_k, small_split_k=config.small_split_k,
                small_items=config.small_items, num_slices=len(module_ids), num_rank_tiles=num_rank_tiles,
                stride_xm=x.stride(0), stride_xk=x.stride(1), stride_as=a_addr.stride(0),
                stride_am=a_addr.stride(1), stride_rs=ranks.stride(0), stride_hs=h.stride(0),
                stride_ht=h.stride(1), stride_hi=h.stride(2))
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
                      EVEN_K=k_in % config.block_k == 0, UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16)
    grid = _persistent_grid(meta.work_bound(t, config.block_m) * inner, config.shrink_programs_per_sm, x.device)
    return Launch(_shrink_kernel, grid, args, constexprs, config.num_warps, config.num_stages, _SHRINK_DYNAMIC)


def _expand_launch(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                   b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                   module_ids: Sequence[int], slice_widths: Sequence[int], max_rank: int,
                   config: KernelConfig) -> Launch:
    t = y.shape[0]
    _check_modules(module_ids)
    _check_pool(pool, y)
    _check_tables("b_addr", b_addr, ranks, meta, max_rank, y.device)
    _check_tokens(t, meta)
    _check_slices(y, module_ids, slice_widths)
    if scales.dtype != torch.float32 or scales.shape != ranks.shape or not scales.is_contiguous() \
            or scales.device != y.device:
        raise ValueError(f"scales must be contiguous fp32 {tuple(ranks.shape)} on {y.device}, got "
                         f"{scales.dtype} {tuple(scales.shape)} on {scales.device}")
    split = config.max_split
    if h.dtype != torch.float32 or h.dim() != 4 or h.shape[0] != split or h.shape[1] < t \
            or h.shape[2] != len(module_ids) or h.shape[3] < max_rank or h.stride(3) != 1 or h.device != y.device:
        raise ValueError(f"h must be the fp32 shrink buffer [{split}, >={t}, {len(module_ids)}, >={max_rank}] "
                         f"on {y.device}, got {h.dtype} {tuple(h.shape)} on {h.device}")
    work = meta.work[config.block_m]
    n_tiles = sum(triton.cdiv(w, config.block_n) for w in slice_widths)
    m0, m1, m2 = _pad3(module_ids, module_ids[0])
    w0, w1, w2 = _pad3(slice_widths, 0)
    args = dict(y_ptr=y, h_ptr=h, pool_ptr=pool, work_ptr=work, work_stride=work.stride(0),
                count_ptr=meta.work_count[config.block_m], sched_ptr=meta.sched[EXPAND_COUNTERS],
                sorted_ptr=meta.sorted_tokens, b_addr_ptr=b_addr, ranks_ptr=ranks, scales_ptr=scales,
                m0=m0, m1=m1, m2=m2, w0=w0, w1=w1, w2=w2, max_rank=max_rank, n_tiles=n_tiles, split_k=config.split_k,
                small_split_k=config.small_split_k, small_items=config.small_items,
                stride_ym=y.stride(0), stride_yn=y.stride(1), stride_bs=b_addr.stride(0), stride_bm=b_addr.stride(1),
                stride_rs=ranks.stride(0), stride_hs=h.stride(0), stride_ht=h.stride(1), stride_hi=h.stride(2))
    constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_kr, SPLIT_K=config.split_k,
                      SMALL_SPLIT=config.max_split != config.split_k,
                      RANK_P2=max(16, triton.next_power_of_2(max_rank)),
                      EVEN_N=all(w % config.block_n == 0 for w in slice_widths))
    grid = _persistent_grid(meta.work_bound(t, config.block_m) * n_tiles, config.expand_programs_per_sm, y.device)
    return Launch(_expand_kernel, grid, args, constexprs, config.num_warps, config.num_stages, _EXPAND_DYNAMIC)


def paged_lora_shrink(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                      a_addr: torch.Tensor, ranks: torch.Tensor, module_ids: Sequence[int],
                      max_rank: int, config: KernelConfig | None = None) -> None:
    """h[sp, t, i, :r] = partial (over K split sp) of x[t] @ A^T, for tokens in segments."""
    config = config or choose_config(x.shape[0], x.shape[1], max_rank)
    launch = _shrink_launch(h, x, pool, meta, a_addr, ranks, module_ids, max_rank, config)
    if x.shape[0]:
        launch()


def paged_lora_expand(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                      b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      module_ids: Sequence[int], slice_widths: Sequence[int], max_rank: int,
                      config: KernelConfig) -> None:
    """y[t, slice i] += scales[s, m_i] * (sum over splits of h[:, t, i, :r]) @ B^T, with the config
    the shrink that wrote h used."""
    launch = _expand_launch(y, h, pool, meta, b_addr, ranks, scales, module_ids, slice_widths, max_rank, config)
    if y.shape[0]:
        launch()


def launch_plans(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                 a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                 module_ids: Sequence[int], slice_widths: Sequence[int], max_rank: int,
                 config: KernelConfig | None = None) -> tuple[Launch, Launch]:
    """The (shrink, expand) launches `paged_lora_linear` makes for these arguments, not run."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [T, K] and y [T, N] with the same T, got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise ValueError(f"y is {y.dtype} but x is {x.dtype}")
    _check_modules(module_ids)
    _check_slices(y, module_ids, slice_widths)
    config = config or choose_config(x.shape[0], x.shape[1], max_rank)
    h = shrink_buffer(x.shape[0], len(module_ids), max_rank, config, x.device)
    return (_shrink_launch(h, x, pool, meta, a_addr, ranks, module_ids, max_rank, config),
            _expand_launch(y, h, pool, meta, b_addr, ranks, scales, module_ids, slice_widths, max_rank, config))


def _check_tokens(t: int, meta: SegmentMeta) -> None:
    if t > meta.max_tokens:
        raise ValueError(f"{t} tokens exceed SegmentMeta.max_tokens={meta.max_tokens}")
    if t < meta.num_tokens:
        raise ValueError(f"the activations have {t} rows but SegmentMeta.update was given {meta.num_tokens} tokens")


def paged_lora_linear(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                      a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor,
                      scales: torch.Tensor, module_ids: tuple[int, ...], slice_widths: tuple[int, ...],
                      max_rank: int, config: KernelConfig | None = None) -> None:
    """y += LoRA(x) for rows whose slot (set by `meta.update`) is >= 0; other rows are untouched.

    y [T, sum(widths)] may be a strided view of the layer output; x [T, K]; pool 1-D, x's dtype.
    """
    shrink, expand = launch_plans(y, x, pool, meta, a_addr, b_addr, ranks, scales, module_ids, slice_widths,
                                  max_rank, config)
    if x.shape[0]:
        shrink()
        expand()
