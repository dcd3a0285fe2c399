"""Admission by host readiness: the pure split (admission.plan_admission) and the real vLLM
schedulers (sync and async) with a fake readiness oracle: no head-of-line blocking, host loads
started in the same step, starvation guard, the worker link as the oracle."""

from __future__ import annotations

import dataclasses

import pytest

from slora_plugin.pool.admission import plan_admission
from slora_plugin.pool.commands import commands_of
from slora_plugin.pool.scheduler import scheduler_class
from slora_plugin.pool.worker_link import HostLoadWaits, WorkerLink, engine_key, publish
from vllm.v1.request import RequestStatus
from vllm_cpu import add_requests, build_vllm_config, create_scheduler, engine_loop, lora, make_request

BOTH = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


class FakeReadiness:
    """Host copies become ready only when the test says so; records every call."""

    def __init__(self, ready=(), errors=None):
        self.ready_paths = set(ready)
        self.errors: dict[str, str] = dict(errors or {})
        self.started: list[str] = []
        self.asked: list[str] = []

    def error(self, path: str) -> str | None:
        return self.errors.get(path)

    def ready(self, path: str) -> bool:
        self.asked.append(path)
        return path in self.ready_paths

    def start(self, path: str) -> None:
        self.started.append(path)

    def finish_all(self) -> None:
        self.ready_paths.update(self.started)


def path(i: int) -> str:
    return f"/adapters/adapter-{i}"


# ----------------------------------------------------------------------------- pure split

def split(reqs, fake, resident=(), slots=8, start_limit=4, scan_limit=100, idle=False):
    return plan_admission(reqs, lambda r: None if r is None else (r, path(r)),
                          lambda i: i in resident, fake, slots=slots, start_limit=start_limit,
                          scan_limit=scan_limit, idle=idle)


def test_not_ready_is_held_and_started_while_the_rest_stays_admissible():
    fake = FakeReadiness(ready={path(2)})
    plan = split([1, 2, None, 3, 1], fake, resident={3})
    assert plan.held == [1, 1] and plan.later == [] and plan.forced is None
    assert fake.started == [path(1)] and plan.started == 1
    assert fake.asked == [path(1), path(2)]  # one look per adapter; resident ones need none


def test_loads_start_only_within_the_horizon_of_distinct_adapters():
    fake = FakeReadiness(ready={path(2)})
    plan = split([1, 2, 3, 4, 5, 3], fake, start_limit=3)
    assert fake.started == [path(1), path(3)]  # 2 is ready but counts in the horizon
    assert plan.held == [1, 3, 4, 5, 3]


def test_scan_stops_when_slots_and_horizon_are_covered():
    fake = FakeReadiness(ready={path(i) for i in range(10)})
    plan = split([None, None, 1, 2, 3, None, 4], fake, slots=2, start_limit=2)
    assert plan.later == [3, None, 4] and plan.held == []
    plan = split(list(range(1, 11)), FakeReadiness(), slots=50, start_limit=50, scan_limit=4)
    assert plan.held == [1, 2, 3, 4] and plan.later == [5, 6, 7, 8, 9, 10]


def test_idle_engine_admits_the_first_held_request_anyway():
    plan = split([1, 2], FakeReadiness(), idle=True)
    assert plan.forced == 1 and plan.held == [2]
    assert split([1, 2], FakeReadiness(), idle=False).forced is None
    assert split([1, None], FakeReadiness(), idle=True).forced is None  # something else can run


# ----------------------------------------------------------------------------- real schedulers

def gated_scheduler(model_dir, fake, async_scheduling, **kw):
    return create_scheduler(model_dir, num_blocks=kw.pop("num_blocks", 200),
                            async_scheduling=async_scheduling,
                            scheduler_cls=scheduler_class(async_scheduling),
                            scheduler_kwargs={"pages_of": lambda lr: (2, "c"),
                                              "host_readiness": fake}, **kw)


def new_ids(out) -> list[str]:
    return [r.req_id for r in out.scheduled_new_reqs]


@BOTH
def test_a_request_behind_an_unready_adapter_is_admitted(tiny_model_dir, async_scheduling):
    fake = FakeReadiness(ready={path(2)})
    sched = gated_scheduler(tiny_model_dir, fake, async_scheduling)
    running = make_request(16, 50)  # keeps the engine busy: no starvation guard
    add_requests(sched, [running])
    loop = engine_loop(sched)
    loop.step()
    a, b, c = add_requests(sched, [make_request(16, 3, lora_request=lora(1)),
                                   make_request(16, 3, lora_request=lora(2)),
                                   make_request(16, 3)])
    out = loop.step()
    assert new_ids(out) == [b.request_id, c.request_id]
    assert fake.started == [path(1)]  # this very step, not one step later
    assert [l.lora_id for l in commands_of(out).load] == [2] and commands_of(out).prefetch == ()
    assert a.status == RequestStatus.WAITING and list(sched.skipped_waiting) == [a]
    assert sched.pool_stats()["admission_holds"] == 1
    fake.finish_all()
    out = loop.step()
    assert new_ids(out) == [a.request_id]
    assert [l.lora_id for l in commands_of(out).load] == [1]
    loop.run()
    assert sched.pool_stats()["admission_forced"] == 0


@BOTH
def test_an_idle_engine_admits_an_unready_adapter_rather_than_waiting(tiny_model_dir,
                                                                      async_scheduling):
    fake = FakeReadiness()
    sched = gated_scheduler(tiny_model_dir, fake, async_scheduling)
    reqs = add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in (1, 2)])
    loop = engine_loop(sched)
    out = loop.step()
    assert new_ids(out) == [reqs[0].request_id] and fake.started == [path(1), path(2)]
    loop.run(max_steps=50)  # never ready: each is admitted once nothing else runs
    stats = sched.pool_stats()
    assert stats["admission_forced"] == 2 and all(r.is_finished() for r in reqs)


@BOTH
def test_queue_order_is_kept_for_requests_not_looked_at(tiny_model_dir, async_scheduling):
    """max_num_seqs 2: the scan stops early; unchecked requests keep their places."""
    fake = FakeReadiness(ready={path(i) for i in range(1, 9)})
    sched = gated_scheduler(tiny_model_dir, fake, async_scheduling, max_num_seqs=2)
    sched.slora_config = type(sched.slora_config)(prefetch_depth=1)
    reqs = add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in range(1, 9)])
    loop = engine_loop(sched)
    order = []
    while sched.has_requests() or loop.in_flight:
        out = loop.step()
        if out is not None:
            order += new_ids(out)
    assert order == [r.request_id for r in reqs]


@BOTH
def test_the_workers_store_is_the_oracle_when_it_shares_the_process(tiny_model_dir,
                                                                    async_scheduling):
    vllm_config = build_vllm_config(tiny_model_dir, async_scheduling=async_scheduling)
    sched = create_scheduler(vllm_config=vllm_config, num_blocks=200,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (2, "c")})
    add_requests(sched, [make_request(16, 2, lora_request=lora(1)), make_request(16, 2)])
    hints = commands_of(engine_loop(sched).step()).prefetch
    assert hints == ()  # no oracle: admitted as before (nothing queued left to hint)
    fake = FakeReadiness()
    link = WorkerLink(fake, HostLoadWaits())
    publish(engine_key(vllm_config), link)
    add_requests(sched, [make_request(16, 2), make_request(16, 2, lora_request=lora(2))])
    out = engine_loop(sched).step()
    # admission_by_host_readiness is off by default: the published store is not consulted
    assert fake.asked == fake.started == [] and len(out.scheduled_new_reqs) == 2
    sched.slora_config = dataclasses.replace(sched.slora_config, admission_by_host_readiness=True)
    add_requests(sched, [make_request(16, 2), make_request(16, 2, lora_request=lora(3))])
    engine_loop(sched).step()
    assert fake.started == [path(3)]


def test_prefetch_depth_zero_turns_the_gate_off(tiny_model_dir):
    fake = FakeReadiness()
    sched = gated_scheduler(tiny_model_dir, fake, False)
    sched.slora_config = type(sched.slora_config)(prefetch_depth=0)
    add_requests(sched, [make_request(16, 2, lora_request=lora(1)), make_request(16, 2)])
    out = sched.schedule()
    assert len(out.scheduled_new_reqs) == 2 and fake.asked == fake.started == []


def test_priority_scheduling_holds_and_puts_back(tiny_model_dir):
    vllm_config = build_vllm_config(tiny_model_dir)
    vllm_config.scheduler_config.policy = "priority"
    fake = FakeReadiness(ready={path(2)})
    sched = create_scheduler(vllm_config=vllm_config, num_blocks=200,
                             scheduler_cls=scheduler_class(False),
                             scheduler_kwargs={"pages_of": lambda lr: (2, "c"),
                                               "host_readiness": fake})
    busy = add_requests(sched, [make_request(16, 20)])
    sched.schedule()
    a, b = add_requests(sched, [make_request(16, 2, lora_request=lora(1), priority=0),
                                make_request(16, 2, lora_request=lora(2), priority=1)])
    out = sched.schedule()
    assert new_ids(out) == [b.request_id] and list(sched.skipped_waiting) == [a]
    assert busy[0].status == RequestStatus.RUNNING


@BOTH
def test_a_failed_host_load_fails_only_its_requests_before_admission(tiny_model_dir, async_scheduling):
    """Truncated weights pass the config check; once the host load failed, the adapter's
    waiting requests finish with its reason and are never admitted (the worker's load would
    fail); the others run."""
    reason = "adapter 'adapter-1', file adapter_model.safetensors: truncated (read 10 of 20 bytes)"
    fake = FakeReadiness(ready={path(1), path(2)}, errors={path(1): reason})
    sched = gated_scheduler(tiny_model_dir, fake, async_scheduling)
    _check_known_failure_fails_only_its_request(sched, reason)


def _check_known_failure_fails_only_its_request(sched, reason: str) -> None:
    """Adapter 1's host load is known to have failed, adapter 2 is fine: the first step admits
    only adapter 2's request and finishes adapter 1's with the reason; the other runs to the end."""
    bad, good = add_requests(sched, [make_request(16, 3, lora_request=lora(1)),
                                     make_request(16, 3, lora_request=lora(2))])
    loop = engine_loop(sched)
    out = loop.step()
    assert new_ids(out) == [good.request_id]
    assert [l.lora_id for l in commands_of(out).load] == [2]
    assert bad.status == RequestStatus.FINISHED_ERROR and bad.stop_reason == reason
    loop.run()
    assert good.status == RequestStatus.FINISHED_LENGTH_CAPPED


@BOTH
def test_without_the_gate_a_known_failed_host_load_still_fails_before_admission(tiny_model_dir,
                                                                              async_scheduling):
    """admission_by_host_readiness off (the default): nothing is held for readiness, but a
    request whose adapter's host load is known to have failed is never admitted (it would run
    a step without its weights before the worker's failure came back)."""
    reason = "adapter 'adapter-1', file adapter_model.safetensors: truncated (read 10 of 20 bytes)"
    fake = FakeReadiness(ready=(), errors={path(1): reason})
    vllm_config = build_vllm_config(tiny_model_dir, async_scheduling=async_scheduling)
    sched = create_scheduler(vllm_config=vllm_config, num_blocks=200,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (2, "c")})
    link = WorkerLink(fake, HostLoadWaits())
    publish(engine_key(vllm_config), link)
    # adapter 2 is not ready: admitted anyway (no gate), and readiness is never asked
    _check_known_failure_fails_only_its_request(sched, reason)
    assert fake.asked == []


@BOTH
def test_a_load_that_failed_in_the_worker_fails_the_adapters_running_requests(tiny_model_dir,
                                                                             async_scheduling):
    fake = FakeReadiness(ready={path(1), path(2)})
    sched = gated_scheduler(tiny_model_dir, fake, async_scheduling)
    link = WorkerLink(fake, HostLoadWaits())
    publish(engine_key(sched.vllm_config), link)
    a, b = add_requests(sched, [make_request(16, 20, lora_request=lora(1)),
                                make_request(16, 20, lora_request=lora(2))])
    loop = engine_loop(sched)
    loop.step()
    assert a.status == b.status == RequestStatus.RUNNING
    link.failures.add(1, "adapter 'adapter-1': the host cache has no room")
    loop.step()
    assert a.status == RequestStatus.FINISHED_ERROR and "no room" in a.stop_reason
    assert b.status == RequestStatus.RUNNING
    loop.run()
    assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED
    stats = sched.pool_stats()
    assert stats["pages_kv"] == 0
    # the failed adapter's pages were given back: a new request loads it afresh
    assert sched.kv_cache_manager.pool.resident(1) is None
    again, = add_requests(sched, [make_request(16, 2, lora_request=lora(1))])
    out = loop.step()
    assert [l.lora_id for l in commands_of(out).load] == [1]
    loop.run()
    assert again.status == RequestStatus.FINISHED_LENGTH_CAPPED
