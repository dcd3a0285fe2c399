"""Admission by adapter bytes (pool/admission_budget.py): with plain objects, the rule, bounded
waiting, the budget never exceeded but for starving requests, a budget nothing reaches changes
nothing (hypothesis over random queues and a toy engine); in the real vLLM schedulers on CPU,
fewer distinct adapters per step and bounded waiting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_model import write_model_config
from slora_plugin.pool.adapter_pages import base_weight_bytes
from slora_plugin.pool.admission_budget import AdapterBytesBudget, budget_bytes, plan_budget
from slora_plugin.pool.scheduler import scheduler_class
from vllm_cpu import add_requests, build_vllm_config, create_scheduler, engine_loop, lora, make_request

BOTH = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@dataclass(frozen=True)
class Req:
    rid: int
    lora: int | None


def split(waiting, running=(), *, budget, slots=100, max_wait=10, held=None, size=None):
    size = size or (lambda lora: 10)
    held = {} if held is None else held
    return plan_budget(waiting, lambda r: r.lora, lambda r: size(r.lora),
                       [(a, size(a)) for a in running], budget_bytes=budget, slots=slots,
                       max_wait_steps=max_wait, held_steps=held, key=lambda r: r.rid)


def test_the_batch_adapters_go_first_and_new_ones_wait_for_room():
    q = [Req(0, 2), Req(1, 1), Req(2, None), Req(3, 3), Req(4, 1)]
    plan = split(q, running=[1], budget=10)  # adapter 1 alone fills the budget
    assert plan.held == [Req(0, 2), Req(3, 3)]
    assert plan.adapters == 1 and plan.adapter_bytes == 10 and plan.starving == 0
    plan = split(q, running=[1], budget=20)  # room for one more: the first new one in order
    assert plan.held == [Req(3, 3)] and plan.adapters == 2


def test_an_empty_batch_takes_its_first_adapter_whatever_its_size():
    plan = split([Req(0, 5), Req(1, 6), Req(2, 5)], budget=1)
    assert plan.held == [Req(1, 6)] and plan.adapter_bytes == 10


def test_a_held_request_within_reach_starves_after_max_wait_steps_and_is_admitted():
    held: dict = {}
    q = [Req(0, 2), Req(1, 3)]
    for step in range(3):
        plan = split(q, running=[1], budget=10, max_wait=3, held=held, slots=1)
        assert plan.held == q
        # only the first is within reach (one slot): the second is not charged
        assert held == {0: step + 1}
    plan = split(q, running=[1], budget=10, max_wait=3, held=held, slots=1)
    assert plan.held == [Req(1, 3)] and plan.starving == 1 and held == {0: 3}
    # vLLM left it waiting (no KV memory): still starving next step, not held again
    plan = split(q, running=[1], budget=10, max_wait=3, held=held, slots=1)
    assert plan.held == [Req(1, 3)] and plan.starving == 1


def test_the_state_object_caches_sizes_drops_finished_requests_and_counts():
    @dataclass
    class LR:
        lora_int_id: int

    @dataclass
    class VReq:
        request_id: str
        lora_request: LR | None

    asked = []
    policy = AdapterBytesBudget(10, 2, lambda r: asked.append(r.lora_request.lora_int_id) or 10)
    running = [VReq("r", LR(1)), VReq("r2", LR(1))]
    q = [VReq("a", LR(2)), VReq("b", LR(2)), VReq("c", LR(1))]
    plan = policy.plan(q, running, slots=8, alive={"a", "b", "c"})
    assert [r.request_id for r in plan.held] == ["a", "b"]
    policy.plan(q, running, slots=8, alive={"a", "b", "c"})
    assert sorted(asked) == [1, 2] and policy.holds == 4 and policy.held_steps == {"a": 2, "b": 2}
    plan = policy.plan(q[1:], running, slots=8, alive={"b", "c"})  # "a" finished
    assert plan.starving == 1 and plan.held == [] and policy.held_steps == {"b": 2}
    assert policy.starving == 1
    policy.plan(q[2:], [*running, q[1]], slots=8, alive={"b", "c"})  # "b" runs
    assert policy.held_steps == {}
    assert budget_bytes(0.5, 13_000) == 6_500


# --------------------------------------------------------------- a toy engine over many steps

def run(queue: list[Req], *, budget: int | None, slots: int, lifetime: dict[int, int],
        max_wait: int, size) -> tuple[list[list[int]], dict[int, int],
                                      list[tuple[int, int, int]], list[int]]:
    """Steps of a toy engine: each step admits, in order, up to the free slots among the
    requests the policy leaves visible (all when `budget` is None); a request runs
    `lifetime[rid]` steps. Returns the admitted request ids per step, the steps each request
    was held within reach, per step the batch's adapter bytes (before and after admitting, and
    the largest new adapter), and per step the starving admissions."""
    waiting = list(queue)
    running: dict[int, tuple[Req, int]] = {}
    admitted, bytes_per_step, starving_per_step = [], [], []
    held: dict = {}
    reach: dict[int, int] = {}
    while waiting or running:
        free = slots - len(running)
        if budget is None:
            visible, starving = waiting, 0
        else:
            plan = split(waiting, [r.lora for r, _ in running.values() if r.lora is not None],
                         budget=budget, slots=free, max_wait=max_wait, held=held, size=size)
            gone = {r.rid for r in plan.held}
            visible, starving = [r for r in waiting if r.rid not in gone], plan.starving
            for r in waiting:
                if r.rid in held:
                    reach[r.rid] = max(reach.get(r.rid, 0), held[r.rid])
        now = visible[:free]
        admitted.append([r.rid for r in now])
        before = {r.lora for r, _ in running.values() if r.lora is not None}
        for r in now:
            waiting.remove(r)
            running[r.rid] = (r, lifetime[r.rid])
        after = {r.lora for r, _ in running.values() if r.lora is not None}
        bytes_per_step.append((sum(size(a) for a in before), sum(size(a) for a in after),
                               max((size(a) for a in after - before), default=0)))
        starving_per_step.append(starving)
        running = {k: (r, left - 1) for k, (r, left) in running.items() if left > 1}
    return admitted, reach, bytes_per_step, starving_per_step


queues = st.lists(st.tuples(st.one_of(st.none(), st.integers(1, 12)), st.integers(1, 6)),
                  min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(queues, st.integers(1, 8), st.integers(1, 5))
def test_a_budget_nothing_reaches_changes_nothing(spec, slots, max_wait):
    q = [Req(i, lora) for i, (lora, _) in enumerate(spec)]
    life = {i: n for i, (_, n) in enumerate(spec)}
    size = lambda lora: 3 + lora  # noqa: E731
    off = run(q, budget=None, slots=slots, lifetime=life, max_wait=max_wait, size=size)
    loose = run(q, budget=10**9, slots=slots, lifetime=life, max_wait=max_wait, size=size)
    assert loose[0] == off[0] and loose[1] == {}


@settings(max_examples=150, deadline=None)
@given(queues, st.integers(1, 8), st.integers(1, 5), st.integers(0, 40))
def test_bounded_waiting_and_the_budget_holds_but_for_starving_requests(spec, slots, max_wait,
                                                                        budget):
    q = [Req(i, lora) for i, (lora, _) in enumerate(spec)]
    life = {i: n for i, (_, n) in enumerate(spec)}
    size = lambda lora: 3 + lora  # noqa: E731
    admitted, reach, per_step, starving = run(q, budget=budget, slots=slots, lifetime=life,
                                              max_wait=max_wait, size=size)
    assert sorted(r for step in admitted for r in step) == list(range(len(q)))  # all served
    assert all(n <= max_wait for n in reach.values())
    for (before, after, largest_new), n_starving in zip(per_step, starving):
        # admissions push the batch past the budget only for starving requests, or with the
        # first adapter of an empty batch
        if n_starving == 0 and after > before:
            assert after <= budget or (before == 0 and after == largest_new)


# ------------------------------------------------------------- the real vLLM scheduler (CPU)

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_model_config(str(tmp_path_factory.mktemp("tiny")))


def serve(model_dir: str, async_scheduling: bool, slora: dict,
          trace: list | None = None) -> tuple[Any, list[int]]:
    """40 requests over 10 adapters (3 pages each), arriving round-robin, through the real
    scheduler with up to 8 running; the distinct adapters scheduled in every step (and, into
    `trace`, the request ids scheduled in every step)."""
    cfg = build_vllm_config(model_dir, max_num_seqs=8, max_num_batched_tokens=4096,
                            max_loras=16, async_scheduling=async_scheduling,
                            additional_config={"slora": slora})
    sched = create_scheduler(vllm_config=cfg, num_blocks=600,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (3, f"c{lr.lora_int_id}")})
    add_requests(sched, [make_request(16, 3 + i % 5, lora_request=lora(1 + i % 10),
                                      request_id=f"r{i}") for i in range(40)])
    loop = engine_loop(sched)
    counts = []
    while sched.has_requests() or loop.in_flight:
        out = loop.step()
        if sched.admission_budget is not None:
            held = sched.admission_budget.held_steps
            assert max(held.values(), default=0) <= sched.slora_config.max_admission_wait_steps
        if out is None:
            continue
        ids = {r.lora_request.lora_int_id for r in out.scheduled_new_reqs if r.lora_request}
        ids |= {sched.requests[rid].lora_request.lora_int_id
                for rid in out.num_scheduled_tokens if rid in sched.requests}
        counts.append(len(ids))
        if trace is not None:
            trace.append(sorted(out.num_scheduled_tokens))
    assert len(loop.finished_reasons()) == 40
    return sched, counts


@BOTH
def test_the_real_scheduler_runs_fewer_distinct_adapters_per_step(model_dir, async_scheduling):
    """Budget for three adapters: at most three distinct adapters per step (none starves with a
    generous bound), against up to eight without it; every request finishes."""
    off, off_counts = serve(model_dir, async_scheduling, {})
    assert off.admission_budget is None and max(off_counts) == 8
    adapter = 3 * off.bytes_per_page
    fraction = 3.5 * adapter / base_weight_bytes(off.vllm_config)
    on, on_counts = serve(model_dir, async_scheduling,
                          {"adapter_bytes_per_step_budget": fraction,
                           "max_admission_wait_steps": 1000})
    assert on.admission_budget.budget_bytes // adapter == 3
    assert max(on_counts) == 3 and on.admission_budget.starving == 0
    assert on.admission_budget.holds > 0


@BOTH
def test_the_real_scheduler_bounds_the_wait(model_dir, async_scheduling):
    """A budget below one adapter with a bound of 2 steps: requests held twice within reach are
    admitted past the budget (starving), so adapters still mix; every request finishes, and no
    request counts more than 2 held steps (checked in every step by `serve`)."""
    probe, _ = serve(model_dir, async_scheduling, {})
    tiny = 0.5 * 3 * probe.bytes_per_page / base_weight_bytes(probe.vllm_config)
    on, counts = serve(model_dir, async_scheduling,
                       {"adapter_bytes_per_step_budget": tiny, "max_admission_wait_steps": 2})
    assert on.admission_budget.starving > 0 and max(counts) > 1


@BOTH
def test_a_budget_nothing_reaches_schedules_exactly_as_without_it(model_dir, async_scheduling):
    off_trace: list = []
    loose_trace: list = []
    serve(model_dir, async_scheduling, {}, off_trace)
    loose, _ = serve(model_dir, async_scheduling, {"adapter_bytes_per_step_budget": 100.0},
                     loose_trace)
    assert loose.admission_budget.holds == 0 and loose_trace == off_trace
