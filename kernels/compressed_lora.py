"""Serving a compressed collection (Compress-then-Serve): y[t, slice] += U_g (Σ_a (V_gᵀ x_t)) for
every token t whose slot s = token_slot[t] holds adapter a of cluster g = slot_group[s].

Why three steps and only one Triton kernel: the bases U_g, V_g are shared by every adapter of a
cluster, so for all tokens at once the work is two *dense* GEMMs (cuBLAS, at full speed, the
same for 1 or 1,000 distinct adapters): z = x @ [V_0 | V_1 | ...] and y += w @ [U_0ᵀ; U_1ᵀ; ...].
Between them each token needs its own adapter's K x K core: w[t, g-block] = Σ_a z[t, g-block]
(zero in the other clusters' blocks and for tokens without an adapter). That gathered product is
the only per-adapter work and the only adapter bytes read per step (K² per adapter and module,
e.g. 8 KB at K = 64 in fp16 against 1.3 MB for a rank-16 Llama-3-8B gate_proj LoRA).

The cores live in the KV page pool like any adapter's rows (`slora_plugin/core_layout.py` places
them): row i of adapter a's core of module m is K elements at `core_addr[s, m, i]` (one row, the
diagonal, with `diagonal`); `has_core[s, m]` is 0 where the adapter has no core for module m
(a layer it does not adapt holds zero rows, as with the paged kernels' ranks). Tokens are grouped
by slot with the paged kernels' `SegmentMeta` (once per step, shared with them): each work item
(a slot's tile of up to 16 tokens) reads its core once and multiplies a 16 x K tile of z by it
with `tl.dot`. The grid is the static work bound of the (padded) token count; every buffer is a
fixed-address view of `CompressedWorkspace`: CUDA-graph safe, no host sync.

Precision: the GEMMs run in the activation dtype with fp32 accumulation (cuBLAS), so z and w
are rounded to it once each; the core product accumulates in fp32 (fp64 for fp64 inputs, which
only the tests use, under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.layout import MODULES

#: Tokens per work item (one of `paged_lora.TILE_M`: its work list is built by SegmentMeta).
BLOCK_M = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CompressedBases:
    """One (layer, module)'s bases of every cluster, as the two GEMMs want them:
    `v_cat` (d_in, G*K) = [V_0 | V_1 | ...], `ut_cat` (G*K, d_out) = [U_0ᵀ; U_1ᵀ; ...]."""

    v_cat: torch.Tensor
    ut_cat: torch.Tensor
    rank: int

    @classmethod
    def from_clusters(cls, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> "CompressedBases":
        """From each cluster's U (d_out, K) and V (d_in, K)."""
        ranks = {u.shape[1] for u in us} | {v.shape[1] for v in vs}
        if len(us) != len(vs) or not us or len(ranks) != 1:
            raise ValueError("one U and one V per cluster, all of the same rank K")
        return cls(torch.cat(list(vs), dim=1).contiguous(), torch.cat([u.T for u in us], dim=0).contiguous(),
                   ranks.pop())

    @property
    def width(self) -> int:
        """G*K: the columns of z and w."""
        return self.v_cat.shape[1]


class CompressedWorkspace:
    """Fixed-address z and w buffers (max_tokens x max_width, the activation dtype): every call
    takes contiguous (T, G*K) views of the same memory, so a captured CUDA graph replays."""

    def __init__(self, max_tokens: int, max_width: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.max_tokens, self.max_width = max_tokens, max_width
        self._z = torch.empty(max_tokens * max_width, dtype=dtype, device=device)
        self._w = torch.empty(max_tokens * max_width, dtype=dtype, device=device)

    def views(self, t: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.max_tokens or width > self.max_width:
            raise ValueError(f"{t} tokens x {width} columns exceed the workspace's "
                             f"{self.max_tokens} x {self.max_width}")
        n = t * width
        return self._z[:n].view(t, width), self._w[:n].view(t, width)


@triton.jit(do_not_specialize=("work_stride", "m", "K"))
def _core_kernel(z_ptr, w_ptr, pool_ptr, work_ptr, work_stride, count_ptr, sorted_ptr, core_addr_ptr,
                 has_core_ptr, group_ptr, m, K, stride_zt, stride_wt, stride_cs, stride_cm, stride_hs,
                 BLOCK_M: tl.constexpr, KP: tl.constexpr, DIAGONAL: tl.constexpr, IEEE: tl.constexpr,
                 ACC: tl.constexpr):
    """Work item `program_id`: w[tokens, g*K : g*K + K] = z[tokens, same] @ coreᵀ (or * diagonal)."""
    item = tl.program_id(0)
    if item >= tl.load(count_ptr):
        return
    slot = tl.load(work_ptr + item).to(tl.int64)
    if tl.load(has_core_ptr + slot * stride_hs + m) == 0:
        return
    start = tl.load(work_ptr + work_stride + item)
    n_tok = tl.load(work_ptr + 2 * work_stride + item)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tok
    tok = tl.load(sorted_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    col0 = tl.load(group_ptr + slot).to(tl.int64) * K
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    tile_mask = m_mask[:, None] & k_mask[None, :]
    z = tl.load(z_ptr + tok[:, None] * stride_zt + col0 + offs_k[None, :], mask=tile_mask, other=0.0)
    rows_ptr = core_addr_ptr + slot * stride_cs + m * stride_cm
    if DIAGONAL:
        diag = tl.load(pool_ptr + tl.load(rows_ptr) + offs_k, mask=k_mask, other=0.0)
        out = z.to(ACC) * diag.to(ACC)[None, :]
    else:
        rows = tl.load(rows_ptr + offs_k, mask=k_mask, other=0)
        core = tl.load(pool_ptr + rows[:, None] + offs_k[None, :], mask=k_mask[:, None] & k_mask[None, :],
                       other=0.0)
        if IEEE:
            out = tl.dot(z, tl.trans(core), input_precision="ieee")
        else:
            out = tl.dot(z, tl.trans(core))
    tl.store(w_ptr + tok[:, None] * stride_wt + col0 + offs_k[None, :], out.to(w_ptr.dtype.element_ty),
             mask=tile_mask)


def core_product(w: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta, core_addr: torch.Tensor,
                 has_core: torch.Tensor, slot_group: torch.Tensor, module_id: int, rank: int,
                 diagonal: bool) -> None:
    """w[t, g*K : g*K + K] = core(s, m) applied to z[t, same], for tokens of slot s >= 0 with a
    core for module m; w's other entries are left as they are (the caller zeroes w)."""
    t = z.shape[0]
    _check(w, z, pool, meta, core_addr, has_core, slot_group, module_id, rank, diagonal)
    if t == 0:
        return
    work = meta.work[BLOCK_M]
    grid = (meta.work_bound(t, BLOCK_M),)
    _core_kernel[grid](z, w, pool, work, work.stride(0), meta.work_count[BLOCK_M], meta.sorted_tokens,
                       core_addr, has_core, slot_group, module_id, rank, z.stride(0), w.stride(0),
                       core_addr.stride(0), core_addr.stride(1), has_core.stride(0),
                       BLOCK_M=BLOCK_M, KP=max(16, triton.next_power_of_2(rank)), DIAGONAL=diagonal,
                       IEEE=z.dtype in (torch.float32, torch.float64),
                       ACC=tl.float64 if z.dtype == torch.float64 else tl.float32)


def compressed_lora_linear(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta,
                           core_addr: torch.Tensor, has_core: torch.Tensor, slot_group: torch.Tensor,
                           bases: Sequence[CompressedBases], module_ids: Sequence[int],
                           slice_widths: Sequence[int], diagonal: bool, workspace: CompressedWorkspace) -> None:
    """y[:, off_i : off_i + w_i] += U_g (Σ (V_gᵀ x)) for each slice i (module `module_ids[i]`,
    bases `bases[i]`) and every token whose slot (set by `meta.update`) is >= 0.

    y [T, sum(widths)] may be a strided view of the layer output; x [T, d_in]; pool 1-D in x's
    dtype; tables as in the module docstring (`core_addr` int64 [S, 7, K] or [S, 7, 1] diagonal,
    `has_core` int32 [S, 7], `slot_group` int32 [S])."""
    if len(bases) != len(module_ids) or len(slice_widths) != len(module_ids) or not module_ids:
        raise ValueError("one CompressedBases and one slice width per module id")
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0] or y.shape[1] != sum(slice_widths):
        raise ValueError(f"x must be [T, d_in] and y [T, {sum(slice_widths)}], got {tuple(x.shape)}, {tuple(y.shape)}")
    t, off = x.shape[0], 0
    for b, m, width in zip(bases, module_ids, slice_widths):
        if b.v_cat.shape[0] != x.shape[1] or b.ut_cat.shape[1] != width or b.v_cat.dtype != x.dtype \
                or b.ut_cat.dtype != x.dtype:
            raise ValueError(f"module {m}: bases {tuple(b.v_cat.shape)} / {tuple(b.ut_cat.shape)} "
                             f"({b.v_cat.dtype}) do not fit x {tuple(x.shape)} ({x.dtype}) and width {width}")
        z, w = workspace.views(t, b.width)
        torch.matmul(x, b.v_cat, out=z)
        w.zero_()
        core_product(w, z, pool, meta, core_addr, has_core, slot_group, m, b.rank, diagonal)
        y[:, off:off + width].addmm_(w, b.ut_cat)
        off += width


def _check(w: torch.Tensor, z: torch.Tensor, pool: torch.Tensor, meta: SegmentMeta, core_addr: torch.Tensor,
           has_core: torch.Tensor, slot_group: torch.Tensor, module_id: int, rank: int, diagonal: bool) -> None:
    if z.dtype not in _DTYPES or w.dtype != z.dtype or pool.dtype != z.dtype or pool.dim() != 1:
        raise ValueError(f"z, w and the 1-D pool must share a float dtype, got {z.dtype}, {w.dtype}, "
                         f"{pool.dtype} {tuple(pool.shape)}")
    if w.shape != z.shape or z.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"w and z must be [T, G*K] with unit column stride, got {tuple(w.shape)}, {tuple(z.shape)}")
    if z.shape[1] % rank:
        raise ValueError(f"z has {z.shape[1]} columns, not a multiple of the rank {rank}")
    rows = 1 if diagonal else rank
    if core_addr.dtype != torch.int64 or core_addr.dim() != 3 or core_addr.shape[1:] != (len(MODULES), rows) \
            or core_addr.stride(2) != 1:
        raise ValueError(f"core_addr must be int64 [S, {len(MODULES)}, {rows}] with unit row stride, got "
                         f"{core_addr.dtype} {tuple(core_addr.shape)}")
    slots = core_addr.shape[0]
    if slots < meta.max_slots:
        raise ValueError(f"the tables have {slots} slots, fewer than SegmentMeta.max_slots={meta.max_slots}")
    if has_core.dtype != torch.int32 or has_core.shape != (slots, len(MODULES)) or has_core.stride(1) != 1:
        raise ValueError(f"has_core must be int32 [{slots}, {len(MODULES)}], "
                         f"got {has_core.dtype} {tuple(has_core.shape)}")
    if slot_group.dtype != torch.int32 or slot_group.shape != (slots,):
        raise ValueError(f"slot_group must be int32 [{slots}], got {slot_group.dtype} {tuple(slot_group.shape)}")
    if not 0 <= module_id < len(MODULES):
        raise ValueError(f"module id {module_id} does not index layout.MODULES")
    for name, tensor in (("pool", pool), ("core_addr", core_addr), ("has_core", has_core),
                         ("slot_group", slot_group), ("SegmentMeta", meta.sorted_tokens)):
        if tensor.device != z.device:
            raise ValueError(f"{name} is on {tensor.device}, the activations on {z.device}")
    if z.shape[0] > meta.max_tokens or z.shape[0] < meta.num_tokens:
        raise ValueError(f"{z.shape[0]} rows, but SegmentMeta holds {meta.num_tokens} tokens (max {meta.max_tokens})")
