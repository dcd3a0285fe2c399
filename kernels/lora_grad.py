"""Weight gradients of the multi-adapter LoRA op (training) as one segmented GEMM kernel (Triton).

For every adapter s present in a batch, over its tokens only (a *segment* of `SegmentMeta`, the
grouping the paged shrink/expand kernels use):

    out[addr[s, m, k] + n] += scales[s, m] * sum_{t in seg(s)} p[t, k] * q[t, n]     (k < ranks[s, m])

The LoRA backward calls it twice per module (`kernels/lora_function.py`): grad A with p = dy @ B
(the grad-x shrink's output) and q = x, rows = A's rows; grad B^T with p = h = x @ A^T (the
forward shrink's output, kept) and q = dy, rows = B^T's rows. The gradient rows are addressed
through the same row tables as the weights, so the fp32 gradient buffer has the master weights'
layout and the optimizer needs no scatter.

Why not the paged kernels for this too: they compute per-token rows (a GEMM over K for each token),
this is a reduction over a segment's tokens (a GEMM over T for each adapter), a different loop
nest. Each program owns (segment, rank tile, column tile, token chunk) and loops over its chunk;
chunks of one segment add into the same output rows with fp32 atomics, so a single adapter's long
segment still spreads over many programs (order of the adds, hence the last bits, is not fixed).
The dot takes p (fp32) and q upcast to fp32 in tf32 on the GPU (10 mantissa bits; the fp32 masters
keep the sum). Training only: the grid comes from the host's largest segment length, and nothing
here is captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slora_plugin.kernels.metadata import SegmentMeta


@dataclass(frozen=True)
class GradConfig:
    """Tile sizes of `segmented_lora_grad`; tuning knobs only (no effect beyond rounding)."""

    block_t: int = 32              # tokens per dot step
    block_n: int = 64              # output columns per program
    tokens_per_program: int = 512  # a segment is split into chunks of this many tokens
    num_warps: int = 4

    def block_r(self, max_rank: int) -> int:
        """Rank rows per program: the whole rank up to 64 (one pass over the tokens per column tile)."""
        return min(64, max(16, triton.next_power_of_2(max_rank)))

    def __post_init__(self) -> None:
        for name in ("block_t", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.tokens_per_program < self.block_t or self.tokens_per_program % self.block_t:
            raise ValueError(f"tokens_per_program must be a multiple of block_t, got {self.tokens_per_program}")


@triton.jit
def _segment_grad_kernel(out_ptr, p_ptr, q_ptr, sorted_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
                         addr_ptr, ranks_ptr, scales_ptr, m, N, max_rank, tokens_per_program,
                         n_rank_tiles, n_col_tiles, n_chunks,
                         stride_pt, stride_qt, stride_qn, stride_as, stride_am, stride_rs,
                         BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: (segment, rank tile, column tile, token chunk) -> atomic add into out rows."""
    pid = tl.program_id(0)
    chunk = pid % n_chunks
    rest = pid // n_chunks
    ct = rest % n_col_tiles
    rest = rest // n_col_tiles
    r0 = (rest % n_rank_tiles) * BLOCK_R
    seg = rest // n_rank_tiles
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    r = tl.minimum(tl.load(ranks_ptr + slot * stride_rs + m), max_rank)
    lo = chunk * tokens_per_program
    if (lo < length) & (r0 < r):
        hi = tl.minimum(lo + tokens_per_program, length)
        start = tl.load(seg_start_ptr + seg)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            t_mask = tt < hi
            tok = tl.load(sorted_ptr + start + tt, mask=t_mask, other=0).to(tl.int64)
            p = tl.load(p_ptr + tok[:, None] * stride_pt + offs_r[None, :],
                        mask=t_mask[:, None] & r_mask[None, :], other=0.0)
            q = tl.load(q_ptr + tok[:, None] * stride_qt + offs_n[None, :] * stride_qn,
                        mask=t_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(tl.trans(p), q.to(tl.float32), input_precision="tf32")
        rows = tl.load(addr_ptr + slot * stride_as + m * stride_am + offs_r, mask=r_mask, other=0)
        scale = tl.load(scales_ptr + slot * stride_rs + m)
        tl.atomic_add(out_ptr + rows[:, None] + offs_n[None, :], acc * scale,
                      mask=r_mask[:, None] & n_mask[None, :])


def segmented_lora_grad(out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, meta: SegmentMeta,
                        addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, module_id: int,
                        max_rank: int, max_segment_len: int, config: GradConfig | None = None) -> None:
    """out[addr[s, m, k] + n] += scales[s, m] * p[seg(s), k]^T @ q[seg(s), n] for every segment of
    the last `meta.update` (tokens of slot -1 contribute nothing).

    out: 1-D fp32 (the gradient buffer, master layout); p: fp32 [T, >= max_rank] with unit last
    stride; q: [T, N] any float dtype and strides; addr int64 [S, 7, R], ranks int32 / scales fp32
    [S, 7] (the kernel contract's tables, column `module_id`); `max_segment_len` >= the longest
    segment (the host knows the batch it built), which sizes the token chunks of the grid.
    """
    config = config or GradConfig()
    t, n = q.shape
    if out.dtype != torch.float32 or out.dim() != 1:
        raise ValueError(f"out must be a 1-D fp32 tensor, got {out.dtype} {tuple(out.shape)}")
    if p.dtype != torch.float32 or p.dim() != 2 or p.shape[0] < t or p.shape[1] < max_rank or p.stride(1) != 1:
        raise ValueError(f"p must be fp32 [>= {t}, >= {max_rank}] with unit last stride, got "
                         f"{p.dtype} {tuple(p.shape)} strides {p.stride()}")
    if addr.dtype != torch.int64 or addr.dim() != 3 or addr.stride(2) != 1 or addr.shape[2] < max_rank:
        raise ValueError(f"addr must be int64 [S, M, >= {max_rank}] with unit row stride, got "
                         f"{addr.dtype} {tuple(addr.shape)}")
    if ranks.dtype != torch.int32 or scales.dtype != torch.float32 or ranks.shape != addr.shape[:2] \
            or scales.shape != ranks.shape or not (ranks.is_contiguous() and scales.is_contiguous()):
        raise ValueError(f"ranks (int32) and scales (fp32) must be contiguous {tuple(addr.shape[:2])}")
    if addr.shape[0] < meta.max_slots or not 0 <= module_id < addr.shape[1]:
        raise ValueError(f"tables of {addr.shape[0]} slots x {addr.shape[1]} modules do not cover "
                         f"SegmentMeta.max_slots={meta.max_slots} / module {module_id}")
    if t < meta.num_tokens or max_segment_len < 0:
        raise ValueError(f"q has {t} rows but SegmentMeta.update was given {meta.num_tokens} tokens")
    if not t or not max_segment_len:
        return
    block_r = config.block_r(max_rank)
    n_rank_tiles = triton.cdiv(max_rank, block_r)
    n_col_tiles = triton.cdiv(n, config.block_n)
    n_chunks = triton.cdiv(max_segment_len, config.tokens_per_program)
    grid = (meta.max_segments * n_rank_tiles * n_col_tiles * n_chunks,)
    _segment_grad_kernel[grid](
        out, p, q, meta.sorted_tokens, meta.seg_slot, meta.seg_start, meta.seg_len, addr, ranks, scales,
        module_id, n, max_rank, config.tokens_per_program, n_rank_tiles, n_col_tiles, n_chunks,
        p.stride(0), q.stride(0), q.stride(1), addr.stride(0), addr.stride(1), ranks.stride(0),
        BLOCK_T=config.block_t, BLOCK_R=block_r, BLOCK_N=config.block_n, num_warps=config.num_warps)
