"""Plain-torch reference of the paged LoRA op: slow, obvious, and the oracle the Triton kernels
are tested against (on CPU under TRITON_INTERPRET=1 and on the GPU at real sizes).

It reads weights through the same row-address tables as the kernels, so it pins down the kernel
contract (docs/DESIGN.md, "Kernel contract"); it computes in fp32 and rounds once when adding
into `y`, which is the most precise answer the kernels can be held to.
"""

from __future__ import annotations

from typing import Sequence

import torch

from slora_plugin.layout import MODULES


def lora_linear_ref(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                    a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor,
                    scales: torch.Tensor, module_ids: Sequence[int],
                    slice_widths: Sequence[int]) -> None:
    """y[t, off_i : off_i + w_i] += scales[s, m_i] * (x[t] @ A^T) @ B^T for tokens t with slot s >= 0.

    A (r x K) is read as rows `pool[a_addr[s, m, k] : + K]`, B^T (r x w_i) as rows
    `pool[b_addr[s, m, k] : + w_i]`, k < r = ranks[s, m]. Tokens of slot -1 are left untouched.
    Unlike the kernels it may synchronise with the host (it loops over the distinct slots).
    """
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
    k_in = x.shape[1]
    offsets = [sum(slice_widths[:i]) for i in range(len(slice_widths))]
    cols_k = torch.arange(k_in, device=pool.device)
    for slot in torch.unique(token_slot).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(token_slot == slot).squeeze(1)
        xs = x[rows].float()
        for m, off, width in zip(module_ids, offsets, slice_widths):
            r = int(ranks[slot, m])
            if r == 0:
                continue
            a = pool[a_addr[slot, m, :r, None] + cols_k].float()                       # (r, K)
            cols_n = torch.arange(width, device=pool.device)
            bt = pool[b_addr[slot, m, :r, None] + cols_n].float()                      # (r, w)
            delta = (xs @ a.t()) @ bt * float(scales[slot, m])
            y[rows, off:off + width] = (y[rows, off:off + width].float() + delta).to(y.dtype)
