"""The training LoRA op (`kernels/lora_function.py`): its torch reference against finite differences
(gradcheck, fp64) and against autograd on dense PEFT-shaped weights; the Triton path (paged
shrink/expand + `segmented_lora_grad`) against the reference, under the interpreter on CPU
(tiny shapes) and at larger shapes on the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_plugin.kernels.lora_function import LoRATables, PagedBackend, TorchBackend, multi_lora
from slora_plugin.kernels.lora_grad import GradConfig, segmented_lora_grad
from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.kernels.train_reference import segmented_lora_grad_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@dataclass
class Bank:
    """Random adapters of one layer laid out as rows of a flat master, with gaps between them
    (their gradient must stay 0) and table entries past each rank pointing at a gap."""

    master: torch.Tensor
    tables: LoRATables
    used: torch.Tensor  # bool: elements that are some adapter's row
    dense: list[tuple[torch.Tensor, torch.Tensor, float] | None]  # per slot (A [r, K], B [N, r], scale)


def make_bank(ranks: list[int], k_in: int, n_out: int, dtype: torch.dtype, gen: torch.Generator,
              device: str = "cpu") -> Bank:
    max_rank = max(max(ranks), 1)
    a_rows = torch.zeros(len(ranks), max_rank, dtype=torch.int64)
    b_rows = torch.zeros_like(a_rows)
    pos, spans = 3, []
    for s, r in enumerate(ranks):
        for rows, width in ((a_rows, k_in), (b_rows, n_out)):
            for k in range(r):
                rows[s, k] = pos
                spans.append((pos, width))
                pos += width + 1  # one gap element after every row
    master = torch.randn(pos + 2, generator=gen, dtype=torch.float64).to(dtype)
    used = torch.zeros(pos + 2, dtype=torch.bool)
    for start, width in spans:
        used[start:start + width] = True
    scales = torch.rand(len(ranks), generator=gen, dtype=torch.float64) + 0.5
    tables = LoRATables.build(a_rows, b_rows, torch.tensor(ranks), scales)
    dense = []
    for s, r in enumerate(ranks):
        if r == 0:
            dense.append(None)
            continue
        a = torch.stack([master[int(a_rows[s, k]):int(a_rows[s, k]) + k_in] for k in range(r)])
        bt = torch.stack([master[int(b_rows[s, k]):int(b_rows[s, k]) + n_out] for k in range(r)])
        dense.append((a, bt.t(), float(scales[s].float())))
    to = lambda t: t.to(device)  # noqa: E731
    tables = LoRATables(to(tables.a_addr), to(tables.b_addr), to(tables.ranks), to(tables.scales), tables.max_rank)
    return Bank(to(master), tables, to(used), dense)


def test_gradcheck_reference_fp64() -> None:
    """Analytic backward (grad y, grad x, grad of every master element incl. gaps) == finite differences."""
    gen = torch.Generator().manual_seed(0)
    bank = make_bank([2, 0, 3], 4, 5, torch.float64, gen)
    slots = TorchBackend("cpu").prepare(torch.tensor([0, 2, -1, 0, 1, 2, 2], dtype=torch.int32))
    y = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    master = bank.master.clone().requires_grad_()

    def op(y: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return multi_lora(y.clone(), x, m, m, bank.tables, slots)

    assert torch.autograd.gradcheck(op, (y, x, master))


def test_reference_matches_autograd_on_dense_weights_and_sink() -> None:
    """PEFT's math on dense A, B through autograd == the op with its gradient written into a sink."""
    gen = torch.Generator().manual_seed(1)
    bank = make_bank([3, 1, 0, 4], 6, 5, torch.float64, gen)
    token_slot = torch.tensor([3, 0, 0, -1, 1, 3, 2, 0, 3], dtype=torch.int32)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    dy = torch.randn(9, 5, generator=gen, dtype=torch.float64)

    dense = [None if d is None else (d[0].clone().requires_grad_(), d[1].clone().requires_grad_(), d[2])
             for d in bank.dense]
    want = x @ w.t()
    rows = []
    for t, s in enumerate(token_slot.tolist()):
        row = want[t]
        if s >= 0 and dense[s] is not None:
            a, b, scale = dense[s]
            row = row + (b @ (a @ x[t])) * scale
        rows.append(row)
    want = torch.stack(rows)
    want.backward(dy)
    want_dx = x.grad.clone()
    x.grad = None

    master = bank.master.clone().requires_grad_()
    sink = torch.zeros_like(master)
    got = multi_lora(x @ w.t(), x, master, master, bank.tables, TorchBackend("cpu").prepare(token_slot), sink)
    got.backward(dy)
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(x.grad, want_dx)
    assert master.grad is None, "with a sink the master gets no gradient from autograd"
    assert not sink[~bank.used].any(), "a gap between rows received gradient"
    for s, d in enumerate(dense):
        if d is None:
            continue
        a, b, _ = d
        a_addr, b_addr = bank.tables.a_addr[s, 0], bank.tables.b_addr[s, 0]
        for k in range(a.shape[0]):
            torch.testing.assert_close(sink[int(a_addr[k]):int(a_addr[k]) + 6], a.grad[k])
            torch.testing.assert_close(sink[int(b_addr[k]):int(b_addr[k]) + 5], b.grad[:, k])


@dataclass
class Case:
    dtype: torch.dtype
    ranks: list[int]
    k_in: int
    n_out: int
    token_slot: list[int]
    seed: int


@st.composite
def cases(draw) -> Case:
    num_slots = draw(st.integers(1, 4))
    ranks = [draw(st.sampled_from([0, 1, 3, 8, 17])) for _ in range(num_slots)]
    t = draw(st.integers(1, 40))
    return Case(dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])), ranks=ranks,
                k_in=draw(st.sampled_from([16, 40])), n_out=draw(st.sampled_from([16, 24])),
                token_slot=[draw(st.integers(-1, num_slots - 1)) for _ in range(t)],
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def run_both(case: Case, device: str, grad_config: GradConfig | None = None):
    """(Triton results, fp64 reference results on the same low-precision inputs): y, dx, grad."""
    gen = torch.Generator().manual_seed(case.seed)
    bank = make_bank(case.ranks, case.k_in, case.n_out, torch.float32, gen, device)
    t = len(case.token_slot)
    token_slot = torch.tensor(case.token_slot, dtype=torch.int32)
    x = torch.randn(t, case.k_in, generator=gen).to(device, case.dtype)
    y = torch.randn(t, case.n_out, generator=gen).to(device, case.dtype)
    dy = torch.randn(t, case.n_out, generator=gen).to(device, case.dtype)
    pool = bank.master.to(case.dtype)

    master = bank.master.clone().requires_grad_()
    sink = torch.zeros_like(bank.master)
    xg = x.clone().requires_grad_()
    slots = PagedBackend(len(case.ranks), device, grad_config).prepare(token_slot)
    got = multi_lora(y.clone(), xg, master, pool, bank.tables, slots, sink)
    got.backward(dy)

    master64 = pool.double().requires_grad_()
    x64 = x.double().requires_grad_()
    want = multi_lora(y.double(), x64, master64, master64, bank.tables, TorchBackend(device).prepare(token_slot))
    want.backward(dy.double())
    return (got.detach(), xg.grad, sink), (want.detach(), x64.grad, master64.grad), bank, token_slot


def check(case: Case, device: str, grad_rtol: float, grad_config: GradConfig | None = None) -> None:
    (y, dx, grad), (y_ref, dx_ref, grad_ref), bank, token_slot = run_both(case, device, grad_config)
    eps = EPS[case.dtype]
    no_lora = (token_slot < 0).to(device) | (torch.tensor(case.ranks)[token_slot.clamp(min=0).long()] == 0).to(device)
    assert torch.equal(y[no_lora].double(), y_ref[no_lora]), "a row without LoRA changed"
    torch.testing.assert_close(y.double(), y_ref, rtol=2 * eps, atol=2 * eps * float(y_ref.abs().max()))
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2 * eps, atol=2 * eps * float(dx_ref.abs().max()) + 1e-30)
    assert not grad[~bank.used].any(), "a gap between rows received gradient"
    torch.testing.assert_close(grad.double(), grad_ref, rtol=grad_rtol,
                               atol=grad_rtol * float(grad_ref.abs().max()) + 1e-30)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_triton_path_matches_reference(case: Case) -> None:
    """Forward, grad x and both weight gradients of the Triton path within rounding of the fp64
    reference (on CPU under TRITON_INTERPRET=1); weight-gradient chunks of 16 tokens, so a segment
    adds into its rows from several programs."""
    check(case, DEVICE, grad_rtol=1e-2, grad_config=GradConfig(block_t=16, block_n=16, tokens_per_program=16))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranks=st.lists(st.sampled_from([0, 2, 16, 20]), min_size=1, max_size=3),
       token_slot=st.lists(st.integers(-1, 2), min_size=1, max_size=50), seed=st.integers(0, 2 ** 31 - 1))
def test_segmented_grad_kernel_matches_reference(ranks: list[int], token_slot: list[int], seed: int) -> None:
    """The weight-gradient kernel alone, tokens in 16-token chunks (atomic adds), ranks across two
    rank tiles of 16, into a buffer that already holds values (it accumulates)."""
    if not any(ranks):
        ranks = ranks[:-1] + [5]
    token_slot = [s if s < len(ranks) else -1 for s in token_slot]
    gen = torch.Generator().manual_seed(seed)
    bank = make_bank(ranks, 8, 24, torch.float32, gen, DEVICE)
    t = len(token_slot)
    slots = torch.tensor(token_slot, dtype=torch.int32)
    p = torch.randn(t, 32, generator=gen).to(DEVICE)
    q = torch.randn(t, 24, generator=gen).to(DEVICE, torch.float16)
    out = torch.randn(bank.master.shape, generator=gen).to(DEVICE)
    want = out.double()
    segmented_lora_grad_ref(want, p, q, slots, bank.tables.b_addr, bank.tables.ranks, bank.tables.scales, 0)
    meta = SegmentMeta(max_tokens=t, max_slots=len(ranks), device=DEVICE)
    meta.update(slots.to(DEVICE))
    live = slots[slots >= 0].long()
    longest = int(torch.bincount(live).max()) if live.numel() else 0
    segmented_lora_grad(out, p, q, meta, bank.tables.b_addr, bank.tables.ranks, bank.tables.scales, 0,
                        bank.tables.max_rank, longest, GradConfig(block_t=16, block_n=16, tokens_per_program=16))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_path_matches_reference_gpu(dtype: torch.dtype) -> None:
    """Training shapes on the GPU: 2,048 tokens of 8 adapters (ranks 1..64, one absent), K 1,024,
    N 1,536, default tiles (tf32 weight-gradient dots: 1e-2 of the largest element)."""
    gen = torch.Generator().manual_seed(7)
    ranks = [8, 16, 64, 1, 0, 32, 4, 16]
    token_slot = torch.randint(-1, len(ranks), (2048,), generator=gen).tolist()
    check(Case(dtype, ranks, 1024, 1536, token_slot, 3), "cuda", grad_rtol=1e-2)
