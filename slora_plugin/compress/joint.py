"""Joint compression of one (layer, module) of a group of adapters: ΔW_i = s_i B_i A_i ≈ U Σ_i Vᵀ.

Shared U (d_out x K) and V (d_in x K) with orthonormal columns, a core Σ_i per adapter (K x K,
or diagonal). Never forms a d_out x d_in matrix: every product goes through the thin factors.

The method (Brüel-Gabrielsson et al. 2024, "Compress then Serve", arXiv 2407.00066):

1. Bases from SVDs of the stacked factors. The paper stacks the B's (for U) and the A's (for V).
   Here each B_i is first multiplied by R_aᵀ from the QR of A_iᵀ (and each A_iᵀ by R_bᵀ from the
   QR of s_i B_i): then U is exactly the top-K left singular subspace of the stacked ΔW_i, the
   same for every factorisation B M, M⁻¹ A of one ΔW (raw B's would depend on how training split
   the product). Equal to the paper's when the rows of A_i are orthonormal.
2. Full cores: Σ_i = Uᵀ ΔW_i V = (Uᵀ s_i B_i)(A_i V), optimal for given bases. Refinement
   (`iters`) alternates subspace-iteration steps U ← orth(Σ_i w_i² ΔW_i V Σ_iᵀ), then the same
   for V: each step never decreases Σ_i w_i² ‖Σ_i‖², i.e. never increases the total error.
3. Diagonal cores: D_i = diag(Uᵀ ΔW_i V) is optimal for given bases, but which column of U
   goes with which of V now matters; the pairing is found in the K-dimensional space first
   (alternating Procrustes on the full cores, cheap), then `iters` alternating Procrustes steps
   on the bases (U ← polar(Σ_i w_i² ΔW_i V D_i), ...), each an exact minimisation of one block.

Adapters are weighted by w_i = 1/‖ΔW_i‖_F: the objective is then the sum of squared *relative*
errors, the number the report gives, so an adapter with a small ΔW is not sacrificed to the large
ones. Errors are exact: ‖ΔW_i − UΣ_iVᵀ‖_F = ‖R_x R_yᵀ‖_F for X = [s_i B_i, U],
Y = [A_iᵀ, −VΣ_iᵀ] (the residual is X Yᵀ) from the QRs of the thin X and Y; unlike
1 − ‖Σ_i‖²/‖ΔW_i‖² this does not cancel (fp32 resolves errors down to ~1e-6, not ~3e-4), and it
uses the bases and cores as stored (rounded to the storage dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from slora_plugin.compress.source import ModuleStack
from slora_plugin.compress.subspace import leading_subspace, orthonormal, polar

#: Alternations of the K-dimensional pairing of the diagonal variant (each costs O(n K³)); it
#: stops earlier once the captured energy grows by less than `PAIRING_TOL` (relative).
PAIRING_ITERS = 200
PAIRING_TOL = 1e-10


@dataclass(frozen=True)
class JointOptions:
    """How to compress: rank K, core shape, refinement passes, and where to compute."""

    rank: int
    diagonal: bool = False
    iters: int = 2
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float64  # compute dtype
    chunk_bytes: int = 256 << 20        # device memory for one chunk's factors and temporaries
    seed: int = 0


@dataclass(frozen=True)
class ModuleResult:
    """Bases and cores (in the storage dtype, on the CPU) and exact errors, one row per member."""

    u: torch.Tensor         # (d_out, K)
    v: torch.Tensor         # (d_in, K)
    cores: torch.Tensor     # (n, K, K), or (n, K) diagonal
    norms: torch.Tensor     # (n,) fp64: ‖ΔW_i‖_F
    errors: torch.Tensor    # (n,) fp64: ‖ΔW_i − U Σ_i Vᵀ‖_F


def compress_module(stack: ModuleStack, opts: JointOptions, storage: torch.dtype) -> ModuleResult:
    """Compress one (layer, module) of a group of adapters (see the module docstring)."""
    d_out, d_in, k = stack.b.shape[1], stack.a.shape[2], opts.rank
    if k > min(d_in, d_out):
        raise ValueError(f"rank {k} exceeds the module's smaller dimension {min(d_in, d_out)}")
    itemsize = torch.empty((), dtype=opts.dtype).element_size()
    per_adapter = 3 * (stack.rank + k) * (d_in + d_out) * itemsize
    passes = _Passes(stack, max(1, opts.chunk_bytes // per_adapter), opts)
    gen = torch.Generator().manual_seed(opts.seed)
    u, v = passes.initial_bases(gen)
    if opts.diagonal:
        u, v = passes.pair_for_diagonal(u, v)
    for _ in range(opts.iters):
        u, v = passes.refine(u, v)
    return passes.finish(u, v, storage)


class _Passes:
    """The passes over one ModuleStack, a device chunk at a time. `w` holds 1/‖ΔW_i‖ (0 for a
    zero ΔW), computed by the first pass."""

    def __init__(self, stack: ModuleStack, chunk: int, opts: JointOptions) -> None:
        self.stack, self.chunk, self.opts = stack, chunk, opts
        self.ra: list[torch.Tensor] = []  # per chunk: R of QR(A_iᵀ), (c, R, R)
        self.rb: list[torch.Tensor] = []  # per chunk: R of QR(s_i B_i)
        norms = []
        for sb, a in self._chunks():
            ra = torch.linalg.qr(a.transpose(1, 2)).R
            rb = torch.linalg.qr(sb).R
            self.ra.append(ra)
            self.rb.append(rb)
            norms.append(torch.linalg.matrix_norm(rb @ ra.transpose(1, 2)))
        self.norms = torch.cat(norms)
        self.w = torch.where(self.norms > 0, 1.0 / self.norms, torch.zeros_like(self.norms))

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.stack.chunks(self.chunk, self.opts.device, self.opts.dtype)

    def _weights(self) -> Iterator[torch.Tensor]:
        """w_i of each chunk, in chunk order."""
        return iter(self.w.split(self.chunk))

    def initial_bases(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K left singular subspaces of the stacked ΔW_i (columns) and ΔW_iᵀ (rows)."""
        n, r, k = len(self.stack.members), self.stack.rank, self.opts.rank

        def u_blocks() -> Iterator[torch.Tensor]:
            for (sb, _), ra, w in zip(self._chunks(), self.ra, self._weights()):
                yield _side_by_side(sb @ ra.transpose(1, 2) * w[:, None, None])

        def v_blocks() -> Iterator[torch.Tensor]:
            for (_, a), rb, w in zip(self._chunks(), self.rb, self._weights()):
                yield _side_by_side(a.transpose(1, 2) @ rb.transpose(1, 2) * w[:, None, None])

        d_out, d_in = self.stack.b.shape[1], self.stack.a.shape[2]
        return (leading_subspace(u_blocks, d_out, n * r, k, gen),
                leading_subspace(v_blocks, d_in, n * r, k, gen))

    def _sum(self, term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Σ over chunks of term(s B, A, w²) (each a d x K sum over the chunk's members)."""
        total = None
        for (sb, a), w in zip(self._chunks(), self._weights()):
            t = term(sb, a, (w * w)[:, None, None])
            total = t if total is None else total + t
        assert total is not None
        return total

    def refine(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One alternation: U then V (subspace iteration for full cores, Procrustes for diagonal)."""
        if self.opts.diagonal:
            def u_term(sb, a, w2):
                p, q = a @ v, sb.transpose(1, 2) @ u          # (c, R, K)
                d = (q * p).sum(1, keepdim=True)              # (c, 1, K): diag(Uᵀ ΔW V)
                return (sb @ (p * d * w2)).sum(0)
            u = polar(self._sum(u_term))

            def v_term(sb, a, w2):
                p, q = a @ v, sb.transpose(1, 2) @ u
                d = (q * p).sum(1, keepdim=True)
                return (a.transpose(1, 2) @ (q * d * w2)).sum(0)
            return u, polar(self._sum(v_term))

        def u_term(sb, a, w2):
            p, q = a @ v, sb.transpose(1, 2) @ u
            core = q.transpose(1, 2) @ p                      # (c, K, K): Uᵀ ΔW V
            return (sb @ (p @ core.transpose(1, 2) * w2)).sum(0)
        u = orthonormal(self._sum(u_term))

        def v_term(sb, a, w2):
            p, q = a @ v, sb.transpose(1, 2) @ u
            core = q.transpose(1, 2) @ p
            return (a.transpose(1, 2) @ (q @ core * w2)).sum(0)
        return u, orthonormal(self._sum(v_term))

    def pair_for_diagonal(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate U and V within their spans (U P, V Q, P and Q orthogonal K x K) so that the
        cores are as diagonal as possible: alternating Procrustes on the full cores C_i, from the
        eigenvectors of Σ w_i² C_i C_iᵀ and Σ w_i² C_iᵀ C_i (same order: largest with largest)."""
        cores = torch.cat([(sb.transpose(1, 2) @ u).transpose(1, 2) @ (a @ v) for sb, a in self._chunks()])
        w2 = (self.w * self.w)[:, None, None]
        p = torch.linalg.eigh((w2 * cores @ cores.transpose(1, 2)).sum(0)).eigenvectors.flip(1)
        q = torch.linalg.eigh((w2 * cores.transpose(1, 2) @ cores).sum(0)).eigenvectors.flip(1)
        energy = None
        for _ in range(PAIRING_ITERS):
            d = torch.diagonal(p.T @ cores @ q, dim1=1, dim2=2)[:, None, :]
            p = polar((w2 * (cores @ q) * d).sum(0))
            d = torch.diagonal(p.T @ cores @ q, dim1=1, dim2=2)[:, None, :]
            q = polar((w2 * (cores.transpose(1, 2) @ p) * d).sum(0))
            new = float((w2[:, 0] * torch.diagonal(p.T @ cores @ q, dim1=1, dim2=2) ** 2).sum())
            if energy is not None and new - energy <= PAIRING_TOL * max(new, 1e-300):
                break
            energy = new
        return u @ p, v @ q

    def finish(self, u: torch.Tensor, v: torch.Tensor, storage: torch.dtype) -> ModuleResult:
        """Round the bases to `storage`, compute each core against the rounded bases, round it,
        and measure the exact error of what is stored."""
        u_s, v_s = u.to(storage), v.to(storage)
        u, v = u_s.to(self.opts.dtype), v_s.to(self.opts.dtype)
        cores, errors = [], []
        for sb, a in self._chunks():
            core = (sb.transpose(1, 2) @ u).transpose(1, 2) @ (a @ v)          # (c, K, K)
            if self.opts.diagonal:
                core = torch.diagonal(core, dim1=1, dim2=2)
            core_s = core.to(storage)
            core = core_s.to(self.opts.dtype)
            full = torch.diag_embed(core) if self.opts.diagonal else core
            c = sb.shape[0]
            x = torch.cat([sb, u.expand(c, -1, -1)], dim=2)
            y = torch.cat([a.transpose(1, 2), -(v @ full.transpose(1, 2))], dim=2)
            rx, ry = torch.linalg.qr(x).R, torch.linalg.qr(y).R
            errors.append(torch.linalg.matrix_norm(rx @ ry.transpose(1, 2)))
            cores.append(core_s.cpu())
        return ModuleResult(u=u_s.cpu(), v=v_s.cpu(), cores=torch.cat(cores),
                            norms=self.norms.double().cpu(), errors=torch.cat(errors).double().cpu())


def _side_by_side(blocks: torch.Tensor) -> torch.Tensor:
    """(c, d, r) -> (d, c * r): the chunk's blocks as columns of one matrix."""
    c, d, r = blocks.shape
    return blocks.permute(1, 0, 2).reshape(d, c * r)
