"""The linear algebra of joint compression: leading subspaces of stacked factors, without ever
forming a d_out x d_in matrix.

Why these three: the shared bases are the leading left singular vectors of a horizontal stack of
thin blocks (sum of d x r pieces, one per adapter); a refinement step re-orthonormalises a
d x K product (`orthonormal`, subspace iteration: never decreases the captured energy of a
PSD operator); the diagonal variant solves orthogonal Procrustes problems (`polar`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def leading_subspace(blocks: Callable[[], Iterable[torch.Tensor]], dim: int, num_cols: int, k: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The top-k left singular vectors (dim x k, orthonormal) of the horizontal stack of the
    dim x c_i tensors `blocks()` yields (`num_cols` = sum of c_i, an upper bound is fine: zero
    columns change nothing).

    Exact, two ways, whichever needs less memory: the stack itself and its thin SVD when
    num_cols <= dim, else the dim x dim Gram matrix (sum of block @ block^T, accumulated one
    block at a time) and its eigenvectors. When the stack has fewer than k columns the basis is
    completed with orthonormal directions orthogonal to it (their cores are zero).
    """
    if num_cols <= dim:
        parts = list(blocks())
        stack = torch.cat(parts, dim=1) if parts else None
        if stack is None or stack.shape[1] == 0:
            raise ValueError("leading_subspace: no columns")
        left = torch.linalg.svd(stack, full_matrices=False).U[:, :k]
        return complete_basis(left, k, generator)
    gram = None
    for block in blocks():
        gram = block @ block.T if gram is None else gram.addmm_(block, block.T)
    if gram is None:
        raise ValueError("leading_subspace: no columns")
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -k:].flip(1).contiguous()


def complete_basis(q: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`q` (dim x c, orthonormal columns, c <= k <= dim) followed by k - c orthonormal columns
    orthogonal to it (seeded Gaussian directions, orthogonalised twice against q)."""
    dim, c = q.shape
    if c >= k:
        return q
    if k > dim:
        raise ValueError(f"cannot complete a basis of {k} columns in dimension {dim}")
    extra = torch.randn(dim, k - c, generator=generator, dtype=q.dtype, device="cpu").to(q.device)
    for _ in range(2):
        extra = extra - q @ (q.T @ extra)
    extra = torch.linalg.qr(extra).Q
    extra = extra - q @ (q.T @ extra)
    return torch.cat([q, torch.linalg.qr(extra).Q], dim=1)


def orthonormal(m: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of `m` (dim x k; Householder QR keeps the columns
    orthonormal even when `m` is rank-deficient)."""
    return torch.linalg.qr(m).Q


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of `m` (dim x k): argmax over orthonormal Q of tr(Q^T m),
    the solution of the orthogonal Procrustes problem."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh
