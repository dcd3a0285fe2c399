"""Plain-torch reference of the training LoRA op: forward, grad x, and the per-adapter weight
gradients, reading A and B^T rows through the kernel contract's row tables (docs/DESIGN.md).

It is the oracle of the Triton path (`kernels/lora_function.py` with the paged kernels and
`kernels/lora_grad.py`) and the backend of CPU training in any float dtype (the fp32 equivalence
test against PEFT, fp64 gradcheck). The backward is written out, not left to autograd, so that
gradcheck tests the formulas the Triton path implements:

    forward   y[t]  += s * (x[t] A^T) B^T                 for tokens t of adapter s
    grad x    dx[t] += s * (dy[t] B) A
    grad A    dA    += s * (dy_s B)^T x_s                  (segmented GEMM over adapter s's tokens)
    grad B^T  dB^T  += s * (x_s A^T)^T dy_s

Weights are rows of a flat `pool` (A: r rows of length K; B^T: r rows of length N), so the
gradients land in a flat buffer of the same layout. It loops over adapters on the host.
"""

from __future__ import annotations

from typing import Sequence

import torch


def slot_groups(token_slot: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, token rows) for every slot >= 0 present, ascending: the host-side grouping the
    reference loops over (one host sync, shared by every module of a micro-batch)."""
    groups = []
    for slot in torch.unique(token_slot).tolist():
        if slot >= 0:
            groups.append((int(slot), torch.nonzero(token_slot == slot).squeeze(1)))
    return groups


def _rows(pool: torch.Tensor, addr: torch.Tensor, slot: int, module_id: int, r: int, width: int) -> torch.Tensor:
    """Index of the r rows of `width` elements the table gives (slot, module): [r, width]."""
    return addr[slot, module_id, :r, None] + torch.arange(width, device=pool.device)


def lora_forward_ref(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, groups: Sequence[tuple[int, torch.Tensor]],
                     a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                     module_id: int) -> None:
    """y[t] += s * (x[t] A^T) B^T in the pool's dtype, rounded once into y (in place)."""
    k_in, n_out = x.shape[1], y.shape[1]
    for slot, rows in groups:
        r = int(ranks[slot, module_id])
        if r == 0:
            continue
        a = pool[_rows(pool, a_addr, slot, module_id, r, k_in)]
        bt = pool[_rows(pool, b_addr, slot, module_id, r, n_out)]
        delta = ((x[rows].to(pool.dtype) @ a.t()) @ bt) * float(scales[slot, module_id])
        y[rows] = (y[rows].to(pool.dtype) + delta).to(y.dtype)


def lora_backward_ref(dy: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, groups: Sequence[tuple[int, torch.Tensor]],
                      a_addr: torch.Tensor, b_addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
                      module_id: int, grad_pool: torch.Tensor | None, need_dx: bool) -> torch.Tensor | None:
    """Adds dA and dB^T into `grad_pool` (flat, the pool's layout; skipped when None) and returns
    the LoRA part of grad x (None unless `need_dx`; the base linear's part comes from torch)."""
    k_in, n_out = x.shape[1], dy.shape[1]
    dx = torch.zeros_like(x) if need_dx else None
    for slot, rows in groups:
        r = int(ranks[slot, module_id])
        if r == 0:
            continue
        a_idx = _rows(pool, a_addr, slot, module_id, r, k_in)
        b_idx = _rows(pool, b_addr, slot, module_id, r, n_out)
        a, bt = pool[a_idx], pool[b_idx]
        scale = float(scales[slot, module_id])
        xs, dys = x[rows].to(pool.dtype), dy[rows].to(pool.dtype)
        g = dys @ bt.t()                                      # dy B: [n, r]
        if dx is not None:
            dx.index_add_(0, rows, ((g @ a) * scale).to(dx.dtype))
        if grad_pool is not None:
            h = xs @ a.t()                                    # [n, r]
            grad_pool.index_add_(0, a_idx.reshape(-1), ((g.t() @ xs) * scale).reshape(-1).to(grad_pool.dtype))
            grad_pool.index_add_(0, b_idx.reshape(-1), ((h.t() @ dys) * scale).reshape(-1).to(grad_pool.dtype))
    return dx


def segmented_lora_grad_ref(out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, token_slot: torch.Tensor,
                            addr: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, module_id: int) -> None:
    """`lora_grad.segmented_lora_grad` with the sums in fp64, then added into `out`:
    out[addr[s, m, k] + n] += scales[s, m] * sum over tokens t of slot s of p[t, k] q[t, n]."""
    n = q.shape[1]
    for slot, rows in slot_groups(token_slot):
        r = int(ranks[slot, module_id])
        if r == 0:
            continue
        idx = _rows(out, addr, slot, module_id, r, n)
        delta = p[rows, :r].double().t() @ q[rows].double() * float(scales[slot, module_id])
        out.index_add_(0, idx.reshape(-1), delta.reshape(-1).to(out.dtype))
