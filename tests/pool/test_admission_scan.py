"""Admission's single walk over the waiting queue (admission.plan_admission with failed loads):
the same split as the former two passes (failed-load check over the first scan_limit requests,
then the readiness split over the rest), with each oracle call made once per adapter and step,
and the real scheduler finishing the failed requests in the step that finds them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from slora_plugin.pool.admission import AdmissionPlan, plan_admission
from slora_plugin.pool.scheduler import scheduler_class
from vllm.v1.request import RequestStatus
from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request


def path(i: int) -> str:
    return f"/adapters/adapter-{i}"


class CountingReadiness:
    """A fixed oracle that counts its calls per path."""

    def __init__(self, ready=(), errors=None):
        self.ready_paths = set(ready)
        self.errors: dict[str, str] = dict(errors or {})
        self.calls: dict[tuple[str, str], int] = {}
        self.started: list[str] = []

    def _count(self, what: str, p: str) -> None:
        self.calls[what, p] = self.calls.get((what, p), 0) + 1

    def error(self, p: str) -> str | None:
        self._count("error", p)
        return self.errors.get(p)

    def ready(self, p: str) -> bool:
        self._count("ready", p)
        return p in self.ready_paths or p in self.errors  # a failed load is "ready"

    def start(self, p: str) -> None:
        self.started.append(p)


class Req:
    """A waiting request of adapter `lora_id` (None: no adapter); compared by identity."""

    def __init__(self, lora_id: int | None):
        self.lora_id = lora_id

    def __repr__(self) -> str:
        return f"Req({self.lora_id})@{id(self) % 1000}"


def adapter_of(r: Req) -> tuple[int, str] | None:
    return None if r.lora_id is None else (r.lora_id, path(r.lora_id))


def reference(reqs, oracle, resident, *, slots, start_limit, scan_limit, idle) -> AdmissionPlan:
    """The former two passes: `_mark_failed_loads` (one error() per request of the first
    scan_limit), the failed ones taken out of the queue, then the former plan_admission."""
    failed, kept = [], []
    for position, r in enumerate(reqs):
        reason = oracle.error(path(r.lora_id)) if r.lora_id is not None and position < scan_limit else None
        if reason is not None:
            failed.append((r, reason))
        else:
            kept.append(r)
    plan: AdmissionPlan = AdmissionPlan(failed=failed)
    admissible = 0
    verdict: dict[int, bool] = {}
    pending: set[int] = set()
    it = iter(kept)
    for scanned, r in enumerate(it):
        if scanned >= scan_limit or (admissible >= slots and len(pending) >= start_limit):
            plan.later.append(r)
            plan.later.extend(it)
            break
        if r.lora_id is None:
            admissible += 1
            continue
        ok = verdict.get(r.lora_id)
        if ok is None:
            ok = r.lora_id in resident
            if not ok:
                ok = oracle.ready(path(r.lora_id))
                if not ok and len(pending) < start_limit:
                    oracle.start(path(r.lora_id))
                    plan.started += 1
                pending.add(r.lora_id)
            verdict[r.lora_id] = ok
        if ok:
            admissible += 1
        else:
            plan.held.append(r)
    if idle and admissible == 0 and plan.held:
        plan.forced = plan.held.pop(0)
    return plan


ADAPTERS = st.one_of(st.none(), st.integers(1, 8))


@settings(max_examples=300, deadline=None)
@given(queue=st.lists(ADAPTERS, max_size=30), ready=st.sets(st.integers(1, 8)),
       failed=st.sets(st.integers(1, 8), max_size=3), resident=st.sets(st.integers(1, 8)),
       slots=st.integers(0, 10), start_limit=st.integers(0, 5), scan_limit=st.integers(0, 35),
       idle=st.booleans())
def test_one_walk_splits_as_the_two_passes_did(queue, ready, failed, resident, slots,
                                               start_limit, scan_limit, idle):
    reqs = [Req(a) for a in queue]
    errors = {path(i): f"adapter-{i}: truncated" for i in failed}
    ref_oracle = CountingReadiness({path(i) for i in ready}, errors)
    new_oracle = CountingReadiness({path(i) for i in ready}, errors)
    kw = dict(slots=slots, start_limit=start_limit, scan_limit=scan_limit, idle=idle)
    want = reference(reqs, ref_oracle, resident, **kw)
    got = plan_admission(reqs, adapter_of, lambda i: i in resident, new_oracle, **kw)
    if any(reqs.index(r) >= scan_limit for r, _ in got.failed):
        return  # the walk's one difference: test_failed_adapter_beyond_the_first_scan_limit
    assert got.failed == want.failed
    assert got.held == want.held and got.later == want.later and got.forced is want.forced
    assert new_oracle.started == ref_oracle.started and got.started == want.started
    assert all(n == 1 for n in new_oracle.calls.values())  # once per adapter and step
    assert {k for k in new_oracle.calls if k[0] == "ready"} == {
        k for k in ref_oracle.calls if k[0] == "ready"}
    assert {k for k in new_oracle.calls if k[0] == "error"} == {
        k for k in ref_oracle.calls if k[0] == "error"}


def test_failed_adapter_beyond_the_first_scan_limit():
    """Three failed requests in the first scan_limit (3) let the split reach further; a later
    request of the same failed adapter is failed too instead of being offered to vLLM."""
    reqs = [Req(1), Req(1), Req(1), Req(2), Req(1)]
    oracle = CountingReadiness(ready={path(2)}, errors={path(1): "adapter-1: truncated"})
    plan = plan_admission(reqs, adapter_of, lambda i: False, oracle, slots=10, start_limit=5,
                          scan_limit=3, idle=False)
    assert [r for r, _ in plan.failed] == [reqs[0], reqs[1], reqs[2], reqs[4]]
    assert plan.held == [] and plan.later == []
    assert oracle.calls == {("error", path(1)): 1, ("ready", path(2)): 1}


def test_errors_are_checked_past_the_split_up_to_the_scan_limit_once_per_adapter():
    """slots 1 and no start horizon: the split stops after the first request; the failed-load
    check still covers the first scan_limit requests (one error() per adapter), no further."""
    reqs = [Req(2), Req(1), Req(3), Req(1), Req(1)]
    oracle = CountingReadiness(ready={path(2), path(3)}, errors={path(1): "adapter-1: truncated"})
    plan = plan_admission(reqs, adapter_of, lambda i: False, oracle, slots=1, start_limit=0,
                          scan_limit=4, idle=False)
    assert [r for r, _ in plan.failed] == [reqs[1], reqs[3]]  # reqs[4] is past the scan limit
    assert plan.later == [reqs[2], reqs[4]] and plan.held == []
    assert oracle.calls == {("error", path(2)): 1, ("ready", path(2)): 1,
                            ("error", path(1)): 1, ("error", path(3)): 1}


def test_scheduler_fails_them_in_the_step_that_finds_them(tiny_model_dir):
    """max_num_seqs 1 with a request running and a start horizon of 1: the split stops after
    the first request, and the failed-load check still finishes every waiting request of the
    failed adapter in this step."""
    reason = "adapter 'adapter-1', file adapter_model.safetensors: truncated"
    oracle = CountingReadiness(ready={path(1), path(2)}, errors={path(1): reason})
    sched = create_scheduler(tiny_model_dir, num_blocks=200, max_num_seqs=1,
                             scheduler_cls=scheduler_class(False),
                             scheduler_kwargs={"pages_of": lambda lr: (2, "c"),
                                               "host_readiness": oracle})
    sched.slora_config = type(sched.slora_config)(prefetch_depth=1)
    busy, = add_requests(sched, [make_request(16, 20)])
    loop = engine_loop(sched)
    loop.step()
    oracle.calls.clear()
    reqs = add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in (2, 1, 2, 1)])
    loop.step()
    assert [r.status for r in reqs] == [RequestStatus.WAITING, RequestStatus.FINISHED_ERROR,
                                        RequestStatus.WAITING, RequestStatus.FINISHED_ERROR]
    assert reqs[1].stop_reason == reason and busy.status == RequestStatus.RUNNING
    assert oracle.calls == {("error", path(2)): 1, ("ready", path(2)): 1, ("error", path(1)): 1}
    assert list(sched.waiting) + list(sched.skipped_waiting) == [reqs[0], reqs[2]]
    loop.run()
    assert reqs[0].status == reqs[2].status == RequestStatus.FINISHED_LENGTH_CAPPED
    reasons = loop.finished_reasons()
    assert reasons[reqs[3].request_id][1] == reason
