"""The shrink launch of the paged LoRA op: h[t, i, :r] = x[t] @ A_{s,m_i}^T (fp32 accumulation,
K optionally split), A read through the row-address table `a_addr` out of a layer's page pool.

Persistent programs loop over the tasks (work item; slice, rank tile, K split) of the step's real
work items (`metadata.SegmentMeta`); `expand.paged_lora_expand` sums the K-split partials of h.
`shrink_ref` is the torch reference of what those partials sum to (tests/kernels/test_shrink.py);
the whole op's is `lora_linear.lora_linear_exact`.

Row addresses that are multiples of 8 elements (16 bytes) allow 16-byte vector loads. Real
models' rows all are (page and feature sizes are multiples of 8), but nothing in the contract
promises it, so each program checks its rows on the device and falls back to element loads.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.kernels.metadata import (
    SHRINK_COUNTERS,
    SegmentMeta,
    _check_modules,
    _check_pool,
    _check_tables,
    _check_tokens,
    _item_rank,
    _pad3,
    _sched_done,
    _split_for,
    _work_tokens,
)
from slora_plugin.kernels.tiling import KernelConfig, Launch, _padded_rank, _persistent_grid, choose_config


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
#: (x strides, table strides) are the same at every token count and keep the alignment facts the
#: 16-byte vector loads rely on.
_SHRINK_DYNAMIC = ("work_stride", "m0", "m1", "m2", "K", "max_rank", "split_k", "small_split_k", "small_items",
                   "num_slices", "num_rank_tiles", "stride_hs")


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


def shrink_buffer(num_tokens: int, num_slices: int, max_rank: int, config: KernelConfig,
                  device: torch.device | str) -> torch.Tensor:
    """The fp32 h buffer [config.max_split, T, slices, max_rank rounded up to block_r] shrink writes.

    It needs no clearing: expand reads only (split, token, slice, rank) entries shrink wrote this
    call (the splits below the step's split, `_split_for`).
    """
    return torch.empty((config.max_split, num_tokens, num_slices, _padded_rank(max_rank, config)),
                       dtype=torch.float32, device=device)


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


def paged_lora_shrink(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                      a_addr: torch.Tensor, ranks: torch.Tensor, module_ids: Sequence[int],
                      max_rank: int, config: KernelConfig | None = None) -> None:
    """h[sp, t, i, :r] = partial (over K split sp) of x[t] @ A^T, for tokens in segments."""
    config = config or choose_config(x.shape[0], x.shape[1], max_rank)
    launch = _shrink_launch(h, x, pool, meta, a_addr, ranks, module_ids, max_rank, config)
    if x.shape[0]:
        launch()


def shrink_ref(x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, a_addr: torch.Tensor,
               ranks: torch.Tensor, module_ids: Sequence[int]) -> torch.Tensor:
    """What the shrink's K-split partials sum to, in fp64 (the torch reference of the shrink alone).

    Returns [T, slices, R]: h[t, i, :r] = x[t] @ A_{s,m_i}^T for each token t of slot s >= 0, with
    r = ranks[s, m_i] and A's rows read as `pool[a_addr[s, m, k] : + K]`; 0 elsewhere, where the
    kernel writes nothing the expand reads. Slow (a loop over tokens) and obvious, for tests.
    """
    k_in = x.shape[1]
    h = torch.zeros((x.shape[0], len(module_ids), a_addr.shape[2]), dtype=torch.float64, device=x.device)
    cols = torch.arange(k_in, device=pool.device)
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        for i, m in enumerate(module_ids):
            r = int(ranks[slot, m])
            a = pool[a_addr[slot, m, :r, None] + cols].double()                      # (r, K)
            h[t, i, :r] = a @ x[t].double()
    return h
