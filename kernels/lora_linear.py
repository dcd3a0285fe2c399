"""The paged LoRA op: Triton kernels that apply a different LoRA adapter (and rank) per token, reading
the weights through row-address tables out of a layer's KV page pool (S-LoRA / Punica design),
and the op's plain-torch reference.

Two launches per layer, `shrink` then `expand`:

- shrink: h[t, i, :r] = x[t] @ A_{s,m_i}^T            (fp32 accumulation, K optionally split)
- expand: y[t, off_i:off_i+w_i] += scale * h[t, i, :r] @ B_{s,m_i}^T

`shrink.py` and `expand.py` hold the two kernels and their launchers, `metadata.py` the per-step
segment metadata and the work-item helpers both kernels run, `tiling.py` the tile configs, the
decode/prefill choice and the persistent grids (tuning numbers in kernels/NOTES.md). This module
runs the two (`paged_lora_linear`; `launch_plans` exposes the exact launch arguments) and holds the
reference of the op they compute together (each launch has its own beside it: `shrink_ref`,
`expand_ref`).

The reference is slow, obvious, and the oracle the Triton kernels are tested against (on CPU under
TRITON_INTERPRET=1 and on the GPU at real sizes); the worker also runs `lora_linear_ref` where the
kernels cannot run (CPU tensors). It reads weights through the same row-address tables as the
kernels, so it pins down the kernel contract (docs/DESIGN.md, "Kernel contract").
`lora_linear_ref` computes in fp32 and rounds once into `y`; `lora_linear_exact` gives the
unrounded fp64 answer with the error a correct fp16/bf16 kernel may have, element by element
(what the kernel tests check against, with `bound_violations`).

`triton` is imported directly: vLLM swaps it for placeholders when no GPU driver is active, and
the kernels must also run under TRITON_INTERPRET=1 on CPU tensors (where a bf16 `tl.dot` is
not supported, so bf16 tiles are upcast there).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from slora_plugin.kernels.expand import _expand_launch
from slora_plugin.kernels.metadata import SegmentMeta, _check_modules, _check_slices
from slora_plugin.kernels.shrink import _shrink_launch, shrink_buffer
from slora_plugin.kernels.tiling import KernelConfig, Launch, choose_config
from slora_plugin.layout import MODULES


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


def lora_linear_ref(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                    a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor,
                    scales: torch.Tensor, module_ids: Sequence[int],
                    slice_widths: Sequence[int]) -> None:
    """y[t, off_i : off_i + w_i] += scales[s, m_i] * (x[t] @ A^T) @ B^T for tokens t with slot s >= 0.

    A (r x K) is read as rows `pool[a_addr[s, m, k] : + K]`, B^T (r x w_i) as rows
    `pool[b_addr[s, m, k] : + w_i]`, k < r = ranks[s, m]. Tokens of slot -1 are left untouched.
    Unlike the kernels it may synchronise with the host (it loops over the distinct slots).
    """
    _check_args(y, x, token_slot, a_addr, ranks, module_ids, slice_widths)
    for rows, off, width, xs, a, bt, scale in _slot_terms(x, pool, token_slot, a_addr, b_addr, ranks, scales,
                                                           module_ids, slice_widths, torch.float32):
        delta = (xs @ a.t()) @ bt * scale
        y[rows, off:off + width] = (y[rows, off:off + width].float() + delta).to(y.dtype)


def lora_linear_exact(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                      a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      module_ids: Sequence[int], slice_widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, allowed): the op's result on `y` in fp64 (no rounding at all), and for each element
    the error a correct kernel may have, i.e. one whose inputs are the fp16/bf16 x, A, B, y and that
    accumulates in fp32, feeds h to the expand dot as tf32, and rounds once into y's dtype.

    `allowed = e + ulp(|exact| + e)` with, per element (sums over the rank rows k of its slice,
    s the slot's scale, h_k = x . A_k, ulp = y's dtype eps at the element's binade):
      - `e_tf32 = 2^-10 * s * sum_k |h_k| |B_k|`: h is rounded to tf32 (10 mantissa bits) in the
        expand dot; 2^-10, not 2^-11, because tensor cores may truncate instead of rounding. B is
        fp16/bf16, hence exact in tf32, and the products are exact in fp32.
      - `e_acc = sqrt(K + r) * 2^-23 * s * sum_k (sum_j |x_j A_kj|) |B_k|`: the fp32 sums of K
        products (shrink, K split or not) and r products (expand). The rounding errors of n additions
        of random sign grow like sqrt(n), and sum |terms| bounds every partial sum, so this is far
        above the real accumulation error (two orders of magnitude for plain sequential fp32 sums
        of these random weights), while the worst-case bound n * u * sum|terms| would be as large as
        the LoRA delta itself and catch nothing. 2^-23: MMA accumulation may truncate.
      - `ulp(|exact| + e)`: the single rounding into y's dtype (half an ulp, doubled so a value
        that rounds across a binade edge is covered), at the magnitude the computed value may have.
    Elements outside the LoRA rows and slices are returned unchanged with allowed 0 (bit-exact).
    A dropped or wrong rank row, a wrong scale or a missing slice moves an element by about
    |s h_k B_k|, which for these weights exceeds `allowed` in most elements of the affected tokens.
    """
    _check_args(y, x, token_slot, a_addr, ranks, module_ids, slice_widths)
    exact = y.double().clone()
    allowed = torch.zeros_like(exact)
    lora = torch.zeros_like(exact, dtype=torch.bool)
    for rows, off, width, xs, a, bt, scale in _slot_terms(x, pool, token_slot, a_addr, b_addr, ranks, scales,
                                                           module_ids, slice_widths, torch.float64):
        h = xs @ a.t()
        exact[rows, off:off + width] += (h @ bt) * scale
        e_tf32 = 2.0 ** -10 * abs(scale) * (h.abs() @ bt.abs())
        e_acc = (a.shape[1] + a.shape[0]) ** 0.5 * 2.0 ** -23 * abs(scale) * ((xs.abs() @ a.abs().t()) @ bt.abs())
        allowed[rows, off:off + width] += e_tf32 + e_acc
        lora[rows, off:off + width] = True
    allowed[lora] += _ulp(exact[lora].abs() + allowed[lora], y.dtype)
    return exact, allowed


def bound_violations(got: torch.Tensor, exact: torch.Tensor, allowed: torch.Tensor) -> tuple[int, float]:
    """(number of elements of `got` outside `exact +- allowed`, largest |got - exact| / allowed).

    Elements with allowed 0 must be equal (a ratio of inf when they are not); NaN counts as outside.
    """
    err = (got.double() - exact).abs()
    bad = ~(err <= allowed)
    ratio = torch.where(allowed > 0, err / allowed, torch.where(err == 0, 0.0, float("inf")))
    ratio = torch.where(torch.isnan(err), float("inf"), ratio)
    return int(bad.sum()), float(ratio.max()) if ratio.numel() else 0.0


def _check_args(y: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, a_addr: torch.Tensor,
                ranks: torch.Tensor, module_ids: Sequence[int], slice_widths: Sequence[int]) -> None:
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T, K] and y [T, N] with the same T; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if len(module_ids) != len(slice_widths) or not module_ids:
        raise ValueError(f"module_ids {tuple(module_ids)} and slice_widths {tuple(slice_widths)} "
                         "must be non-empty and of the same length")
    if any(not 0 <= m < len(MODULES) for m in module_ids):
        raise ValueError(f"module ids must index layout.MODULES (0..{len(MODULES) - 1}), got {tuple(module_ids)}")
    if sum(slice_widths) != y.shape[1]:
        raise ValueError(f"y has {y.shape[1]} columns but the slices are {tuple(slice_widths)} wide")
    if token_slot.shape != (x.shape[0],):
        raise ValueError(f"token_slot must be [{x.shape[0]}], got {tuple(token_slot.shape)}")
    num_slots, _, max_rows = a_addr.shape
    if token_slot.numel() and int(token_slot.max()) >= num_slots:
        raise ValueError(f"token_slot holds slot {int(token_slot.max())} but the tables have {num_slots} slots")
    if int(ranks.max()) > max_rows:
        raise ValueError(f"a rank of {int(ranks.max())} exceeds the {max_rows} rows of the address tables")


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at each magnitude (subnormal spacing below the normal range)."""
    info = torch.finfo(dtype)
    binade = torch.exp2(torch.floor(torch.log2(magnitude.clamp_min(info.tiny))))
    return info.eps * binade


def _slot_terms(x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor, a_addr: torch.Tensor,
                b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, module_ids: Sequence[int],
                slice_widths: Sequence[int], dtype: torch.dtype) -> Iterator[tuple]:
    """(token rows, column offset, width, x rows, A (r, K), B^T (r, w), scale) per slot and slice with r > 0,
    weights read through the row tables and cast to `dtype`."""
    k_in = x.shape[1]
    offsets = [sum(slice_widths[:i]) for i in range(len(slice_widths))]
    cols_k = torch.arange(k_in, device=pool.device)
    for slot in torch.unique(token_slot).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(token_slot == slot).squeeze(1)
        xs = x[rows].to(dtype)
        for m, off, width in zip(module_ids, offsets, slice_widths):
            r = int(ranks[slot, m])
            if r == 0:
                continue
            a = pool[a_addr[slot, m, :r, None] + cols_k].to(dtype)                     # (r, K)
            cols_n = torch.arange(width, device=pool.device)
            bt = pool[b_addr[slot, m, :r, None] + cols_n].to(dtype)                    # (r, w)
            yield rows, off, width, xs, a, bt, float(scales[slot, m])
