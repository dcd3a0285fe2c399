"""Joint compression of one (layer, module), in fp64 against dense references (small shapes).

Stacks are built in memory (no files): `compress_module` sees exactly what `read_module` gives it.
"""

from __future__ import annotations

import pytest
import torch

from slora_plugin.compress.joint import JointOptions, compress_module
from slora_plugin.compress.source import ModuleStack

F64 = torch.float64


def make_stack(factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float] | None = None) -> ModuleStack:
    """A ModuleStack of (A (r, d_in), B (d_out, r)) pairs of mixed ranks, zero-padded like read_module."""
    rank = max(a.shape[0] for a, _ in factors)
    d_in, d_out = factors[0][0].shape[1], factors[0][1].shape[0]
    a = torch.zeros(len(factors), rank, d_in, dtype=F64)
    b = torch.zeros(len(factors), d_out, rank, dtype=F64)
    for i, (ai, bi) in enumerate(factors):
        a[i, :ai.shape[0]] = ai
        b[i, :, :bi.shape[1]] = bi
    s = torch.tensor(scales or [1.0] * len(factors), dtype=F64)
    return ModuleStack(tuple(range(len(factors))), a, b, s)


def random_factors(gen: torch.Generator, ranks: list[int], d_in: int = 24, d_out: int = 20):
    return [(torch.randn(r, d_in, generator=gen, dtype=F64), torch.randn(d_out, r, generator=gen, dtype=F64))
            for r in ranks]


def dense_errors(stack: ModuleStack, res, diagonal: bool) -> torch.Tensor:
    """‖s B A − U Σ Vᵀ‖_F / ‖s B A‖_F, formed densely."""
    out = []
    for i in range(len(stack.members)):
        dw = stack.scales[i] * stack.b[i] @ stack.a[i]
        core = torch.diag(res.cores[i]) if diagonal else res.cores[i]
        out.append(torch.linalg.matrix_norm(dw - res.u @ core @ res.v.T) / torch.linalg.matrix_norm(dw))
    return torch.stack(out)


def opts(rank: int, **kw) -> JointOptions:
    return JointOptions(rank=rank, dtype=F64, **kw)


def test_errors_are_the_dense_errors_with_mixed_ranks_scales_and_chunks():
    gen = torch.Generator().manual_seed(0)
    stack = make_stack(random_factors(gen, [1, 3, 5, 2, 4]), scales=[0.5, 2.0, 1.0, 3.0, 0.25])
    for diagonal in (False, True):
        # chunk_bytes so small that every adapter is its own chunk: the passes must agree
        res = compress_module(stack, opts(4, diagonal=diagonal, chunk_bytes=1), F64)
        assert torch.allclose(res.errors / res.norms, dense_errors(stack, res, diagonal), atol=1e-12)
        dw_norms = torch.stack([torch.linalg.matrix_norm(stack.scales[i] * stack.b[i] @ stack.a[i])
                                for i in range(5)])
        assert torch.allclose(res.norms, dw_norms, rtol=1e-12)
        assert torch.allclose(res.u.T @ res.u, torch.eye(4, dtype=F64), atol=1e-12)
        assert torch.allclose(res.v.T @ res.v, torch.eye(4, dtype=F64), atol=1e-12)


def test_adapters_inside_a_shared_rank_k_subspace_compress_exactly():
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, k = 30, 26, 6
    u0 = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=F64)).Q
    v0 = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=F64)).Q
    factors = []
    for r in (2, 4, 3, 6, 1, 5, 2):  # each B_i in span(U0), each A_i^T in span(V0)
        factors.append((torch.randn(r, k, generator=gen, dtype=F64) @ v0.T,
                        u0 @ torch.randn(k, r, generator=gen, dtype=F64)))
    stack = make_stack(factors, scales=[1.0, 0.5, 2.0, 1.0, 4.0, 1.0, 0.1])
    for iters in (0, 2):
        res = compress_module(stack, opts(k, iters=iters), F64)
        assert float((res.errors / res.norms).max()) < 1e-12
        # the bases span exactly the shared subspaces
        assert torch.allclose(res.u @ res.u.T, u0 @ u0.T, atol=1e-10)
        assert torch.allclose(res.v @ res.v.T, v0 @ v0.T, atol=1e-10)


def test_rank_at_least_the_sum_of_ranks_is_exact():
    gen = torch.Generator().manual_seed(2)
    stack = make_stack(random_factors(gen, [3, 1, 4, 2], d_in=20, d_out=18))  # sum 10
    for k in (10, 14):
        res = compress_module(stack, opts(k, iters=1), F64)
        assert float((res.errors / res.norms).max()) < 1e-12
    # fewer columns than K: the bases are completed with orthonormal directions (zero cores there)
    res = compress_module(make_stack(random_factors(gen, [1, 2], d_in=20, d_out=18)), opts(6, iters=1), F64)
    assert float((res.errors / res.norms).max()) < 1e-12
    assert torch.allclose(res.u.T @ res.u, torch.eye(6, dtype=F64), atol=1e-12)


def test_error_is_monotone_non_increasing_in_k():
    gen = torch.Generator().manual_seed(3)
    stack = make_stack(random_factors(gen, [4, 4, 2, 6, 3, 5]))
    previous = None
    for k in range(1, 19):
        rel = compress_module(stack, opts(k, iters=0), F64)
        rel = rel.errors / rel.norms
        if previous is not None:  # nested bases: every adapter's error, not only the total
            assert bool((rel <= previous + 1e-12).all()), k
        previous = rel
    totals = [float(((lambda r: r.errors / r.norms)(compress_module(stack, opts(k, iters=3), F64)) ** 2).sum())
              for k in range(1, 19)]
    assert all(b <= a + 1e-12 for a, b in zip(totals, totals[1:]))


@pytest.mark.parametrize("diagonal", [False, True])
def test_refinement_never_increases_the_total_relative_error(diagonal):
    gen = torch.Generator().manual_seed(4)
    # two families of adapters around two subspaces, plus noise: refinement has work to do
    factors = random_factors(gen, [3, 2, 4, 3, 5, 2, 3, 4])
    stack = make_stack(factors, scales=[1.0, 3.0, 0.5, 1.0, 1.0, 2.0, 0.7, 1.0])
    totals = []
    for iters in range(6):
        res = compress_module(stack, opts(5, diagonal=diagonal, iters=iters), F64)
        totals.append(float(((res.errors / res.norms) ** 2).sum()))
    assert all(b <= a + 1e-10 for a, b in zip(totals, totals[1:])), totals
    assert totals[-1] < totals[0]


def test_diagonal_cores_exact_for_jointly_diagonal_adapters_and_never_better_than_full():
    gen = torch.Generator().manual_seed(5)
    d_in, d_out, k = 22, 18, 5
    u0 = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=F64)).Q
    v0 = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=F64)).Q
    factors = []
    for _ in range(6):  # ΔW_i = U0 D_i V0^T, written as a rank-k LoRA with a random split
        d = torch.diag(torch.randn(k, generator=gen, dtype=F64))
        m = torch.randn(k, k, generator=gen, dtype=F64) + 3 * torch.eye(k, dtype=F64)
        factors.append((torch.linalg.solve(m, v0.T), u0 @ d @ m))
    stack = make_stack(factors)
    res = compress_module(stack, opts(k, diagonal=True, iters=0), F64)
    assert res.cores.shape == (6, k)
    assert float((res.errors / res.norms).max()) < 1e-9
    random_stack = make_stack(random_factors(gen, [3, 4, 2, 5]))
    full = compress_module(random_stack, opts(4, iters=2), F64)
    diag = compress_module(random_stack, opts(4, diagonal=True, iters=2), F64)
    assert float((diag.errors ** 2).sum()) >= float((full.errors ** 2).sum()) - 1e-12


def test_bases_do_not_depend_on_how_each_product_was_split():
    """B M, M⁻¹ A is the same adapter: the same bases and errors (the paper's raw stacked B's would not)."""
    gen = torch.Generator().manual_seed(6)
    factors = random_factors(gen, [3, 2, 4])
    resplit = []
    for a, b in factors:
        m = torch.randn(a.shape[0], a.shape[0], generator=gen, dtype=F64) + 4 * torch.eye(a.shape[0], dtype=F64)
        resplit.append((torch.linalg.solve(m, a), b @ m))
    r1 = compress_module(make_stack(factors), opts(3, iters=0), F64)
    r2 = compress_module(make_stack(resplit), opts(3, iters=0), F64)
    assert torch.allclose(r1.errors, r2.errors, atol=1e-10)
    assert torch.allclose(r1.u @ r1.u.T, r2.u @ r2.u.T, atol=1e-9)


def test_zero_adapter_and_rounded_storage():
    """A zero ΔW (a fresh PEFT init) gets a zero core and zero error; fp16 storage: the error is
    that of the rounded bases and cores (small, not zero), still exactly the dense one."""
    gen = torch.Generator().manual_seed(7)
    factors = random_factors(gen, [2, 3])
    factors.append((torch.randn(2, 24, generator=gen, dtype=F64), torch.zeros(20, 2, dtype=F64)))
    stack = make_stack(factors)
    res = compress_module(stack, opts(5), F64)
    assert float(res.norms[2]) == 0.0 and float(res.errors[2]) == 0.0 and float(res.cores[2].abs().max()) == 0.0
    half = compress_module(stack, opts(5), torch.float16)
    assert half.u.dtype == half.cores.dtype == torch.float16
    rel = half.errors[:2] / half.norms[:2]
    assert 1e-6 < float(rel.max()) < 1e-2
    dense = dense_errors(make_stack(factors[:2]), _as_f64(half, 2), False)
    assert torch.allclose(rel, dense, rtol=1e-6)


def _as_f64(res, n):
    return type(res)(u=res.u.double(), v=res.v.double(), cores=res.cores[:n].double(), norms=res.norms[:n],
                     errors=res.errors[:n])


def test_rank_larger_than_the_module_is_refused():
    gen = torch.Generator().manual_seed(8)
    stack = make_stack(random_factors(gen, [2], d_in=6, d_out=4))
    with pytest.raises(ValueError, match="exceeds"):
        compress_module(stack, opts(5), F64)
