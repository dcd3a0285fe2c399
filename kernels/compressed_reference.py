"""Plain-torch fp64 reference of the compressed-collection op (`kernels/compressed_lora.py`):
slow, obvious, and the oracle its kernel is tested against.

It reads the cores through the same address tables as the kernel, so it pins down the contract:
for a token of slot s (>= 0) with `has_core[s, m]`, g = slot_group[s], K the rank,
y[t, slice] += ((x[t] @ V_g) @ Σᵀ) @ U_gᵀ with V_g = v_cat[:, gK:(g+1)K],
U_gᵀ = ut_cat[gK:(g+1)K], Σ[i] = pool[core_addr[s, m, i] : + K] (Σ = diag(pool[core_addr[s, m, 0] : + K])
for diagonal cores). Every other element of y is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from slora_plugin.kernels.compressed_lora import CompressedBases


def compressed_lora_exact(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, token_slot: torch.Tensor,
                          core_addr: torch.Tensor, has_core: torch.Tensor, slot_group: torch.Tensor,
                          bases: Sequence[CompressedBases], module_ids: Sequence[int],
                          slice_widths: Sequence[int], diagonal: bool) -> torch.Tensor:
    """The op's result on `y` in fp64 (a new tensor; `y` is not modified)."""
    out = y.double().clone()
    cols = [sum(slice_widths[:i]) for i in range(len(slice_widths))]
    for slot in torch.unique(token_slot).tolist():
        if slot < 0 or slot >= core_addr.shape[0]:
            continue
        rows = torch.nonzero(token_slot == slot).squeeze(1)
        xs = x[rows].double()
        g = int(slot_group[slot])
        for b, m, off, width in zip(bases, module_ids, cols, slice_widths):
            if not int(has_core[slot, m]):
                continue
            k = b.rank
            ks = torch.arange(k, device=pool.device)
            if diagonal:
                core = torch.diag(pool[core_addr[slot, m, 0] + ks].double())
            else:
                core = pool[core_addr[slot, m, :k, None] + ks].double()
            v = b.v_cat[:, g * k:(g + 1) * k].double()
            ut = b.ut_cat[g * k:(g + 1) * k].double()
            out[rows, off:off + width] += ((xs @ v) @ core.T) @ ut
    return out
