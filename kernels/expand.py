"""The expand launch of the paged LoRA op: y[t, off_i:off_i+w_i] += scale * h[t, i, :r] @ B_{s,m_i}^T,
summing the K-split partials of h that `shrink.paged_lora_shrink` wrote, B^T read through the
row-address table `b_addr` out of a layer's page pool.

Persistent programs loop over the tasks (work item; output tile over all slices) of the step's real
work items (`metadata.SegmentMeta`). `expand_ref` is its torch reference
(tests/kernels/test_expand.py); the whole op's is `lora_linear.lora_linear_exact`.

Row addresses that are multiples of 8 elements (16 bytes) allow 16-byte vector loads. Real
models' rows all are (page and feature sizes are multiples of 8), but nothing in the contract
promises it, so each program checks an adapter's rows on the device and falls back to element loads.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.kernels.metadata import (
    EXPAND_COUNTERS,
    SegmentMeta,
    _check_modules,
    _check_pool,
    _check_slices,
    _check_tables,
    _check_tokens,
    _item_rank,
    _pad3,
    _sched_done,
    _split_for,
    _work_tokens,
)
from slora_plugin.kernels.tiling import KernelConfig, Launch, _persistent_grid


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


#: Integer arguments Triton must not specialize on (value 1, multiple of 16): they differ between
#: layers (module ids, tile counts) or with the token count (`stride_hs`), and each new
#: specialization is a JIT compile, during vLLM's CUDA-graph capture. The ones left specialized
#: (y strides, table strides, slice widths) are the same at every token count and keep the
#: alignment facts the 16-byte vector loads and stores rely on.
_EXPAND_DYNAMIC = ("work_stride", "m0", "m1", "m2", "max_rank", "n_tiles", "split_k", "small_split_k", "small_items",
                   "stride_hs")


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


def paged_lora_expand(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                      b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      module_ids: Sequence[int], slice_widths: Sequence[int], max_rank: int,
                      config: KernelConfig) -> None:
    """y[t, slice i] += scales[s, m_i] * (sum over splits of h[:, t, i, :r]) @ B^T, with the config
    the shrink that wrote h used."""
    launch = _expand_launch(y, h, pool, meta, b_addr, ranks, scales, module_ids, slice_widths, max_rank, config)
    if y.shape[0]:
        launch()


def expand_ref(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
               b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, module_ids: Sequence[int],
               slice_widths: Sequence[int]) -> torch.Tensor:
    """y after the expand, in fp64 and unrounded (the torch reference of the expand alone), given h
    summed over its K splits ([T, slices, >= max rank], as `shrink.shrink_ref` returns it).

    y[t, off_i : off_i + w_i] += scales[s, m_i] * h[t, i, :r] @ B^T for each token t of slot s >= 0,
    r = ranks[s, m_i], B^T's rows read as `pool[b_addr[s, m, k] : + w_i]`; other rows unchanged.
    Slow (a loop over tokens) and obvious, for tests.
    """
    out = y.double().clone()
    offsets = [sum(slice_widths[:i]) for i in range(len(slice_widths))]
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        for i, (m, off, width) in enumerate(zip(module_ids, offsets, slice_widths)):
            r = int(ranks[slot, m])
            cols = torch.arange(width, device=pool.device)
            bt = pool[b_addr[slot, m, :r, None] + cols].double()                    # (r, w)
            out[t, off:off + width] += float(scales[slot, m]) * (h[t, i, :r].double() @ bt)
    return out
