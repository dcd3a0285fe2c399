"""The scheduler's host-load decisions of one step (pool/admission_step.py) with plain objects:
which oracle a step uses (and when the worker link is looked up), the failed loads found
without the gate, the admission walk's arguments, and the prefetch hints of vLLM's queues."""

from __future__ import annotations

from types import SimpleNamespace

from slora_plugin.config import SLoRAConfig
from slora_plugin.pool import admission_step
from slora_plugin.pool.admission import plan_admission
from slora_plugin.pool.worker_link import HostLoadWaits, WorkerLink


def lora(i: int) -> SimpleNamespace:
    return SimpleNamespace(lora_int_id=i, lora_name=f"a{i}", lora_path=f"/adapters/a{i}")


def req(rid: str, lora_id: int | None) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, lora_request=None if lora_id is None else lora(lora_id))


class Oracle:
    """HostReadiness with fixed answers, counting calls."""

    def __init__(self, ready=(), errors=None):
        self.ready_paths, self.errors = set(ready), dict(errors or {})
        self.calls: list[tuple[str, str]] = []

    def ready(self, path):
        self.calls.append(("ready", path))
        return path in self.ready_paths

    def start(self, path):
        self.calls.append(("start", path))

    def error(self, path):
        self.calls.append(("error", path))
        return self.errors.get(path)


class Pool:
    """The PagePool calls a step makes: `resident`, and `prefetch_hints` (recorded)."""

    def __init__(self, resident=()):
        self.resident_ids = set(resident)
        self.hint_calls: list[tuple[list, int, int]] = []

    def resident(self, lora_id):
        return object() if lora_id in self.resident_ids else None

    def prefetch_hints(self, adapters, depth, scan_limit):
        self.hint_calls.append((list(adapters), depth, scan_limit))
        return ("hints",)


class Links:
    """The worker-link lookup, counting calls."""

    def __init__(self, link):
        self.link, self.calls = link, 0

    def __call__(self):
        self.calls += 1
        return self.link


def test_scan_limit():
    assert admission_step.scan_limit(16, 4) == 2 * 16 + 8 * 4
    assert admission_step.scan_limit(3, 0) == 6


def test_the_oracle_is_the_explicit_one_else_the_linked_workers_store():
    explicit, store = Oracle(), Oracle()
    links = Links(WorkerLink(store, HostLoadWaits()))
    assert admission_step.host_oracle(explicit, links) is explicit and links.calls == 0
    assert admission_step.host_oracle(None, links) is store and links.calls == 1
    assert admission_step.host_oracle(None, Links(None)) is None


def test_the_gate_needs_a_prefetch_depth_and_the_setting_or_an_explicit_oracle():
    explicit, store = Oracle(), Oracle()
    links = Links(WorkerLink(store, HostLoadWaits()))
    off, on = SLoRAConfig(), SLoRAConfig(admission_by_host_readiness=True)
    assert admission_step.step_readiness(off, None, links) is None and links.calls == 0
    assert admission_step.step_readiness(off, explicit, links) is explicit
    assert admission_step.step_readiness(on, None, links) is store and links.calls == 1
    assert admission_step.step_readiness(on, None, Links(None)) is None
    depth0 = SLoRAConfig(admission_by_host_readiness=True, prefetch_depth=0)
    assert admission_step.step_readiness(depth0, explicit, links) is None and links.calls == 1


def test_known_failed_looks_at_the_first_requests_asking_once_per_adapter():
    oracle = Oracle(errors={"/adapters/a2": "adapter 'a2' (adapter_model.safetensors): truncated"})
    waiting = [req("r0", None), req("r1", 1), req("r2", 2), req("r3", 2), req("r4", 1),
               req("r5", 2)]
    failed = admission_step.known_failed(waiting, oracle, limit=5)
    assert [(r.request_id, why) for r, why in failed] == [
        ("r2", "adapter 'a2' (adapter_model.safetensors): truncated"),
        ("r3", "adapter 'a2' (adapter_model.safetensors): truncated")]  # r5: past the limit
    assert oracle.calls == [("error", "/adapters/a1"), ("error", "/adapters/a2")]


def test_plan_step_is_the_admission_walk_with_the_schedulers_numbers():
    pool = Pool(resident={3})
    waiting = [req("r1", 1), req("r2", 2), req("r3", 3), req("r4", None), req("r5", 4)]
    for running in (0, 1, 3):
        got_oracle, want_oracle = Oracle(ready={"/adapters/a2"}), Oracle(ready={"/adapters/a2"})
        got = admission_step.plan_step(waiting, pool, got_oracle, max_running=4,
                                       num_running=running, prefetch_depth=1)
        want = plan_admission(
            waiting, lambda r: None if r.lora_request is None else (
                r.lora_request.lora_int_id, r.lora_request.lora_path),
            lambda i: i == 3, want_oracle, slots=4 - running, start_limit=1,
            scan_limit=admission_step.scan_limit(4, 1), idle=running == 0)
        assert got == want and got_oracle.calls == want_oracle.calls
    idle = admission_step.plan_step([req("r1", 1)], pool, Oracle(), max_running=4, num_running=0,
                                    prefetch_depth=1)
    assert idle.forced is not None and idle.forced.request_id == "r1"
    busy = admission_step.plan_step([req("r1", 1)], pool, Oracle(), max_running=4, num_running=1,
                                    prefetch_depth=1)
    assert busy.forced is None and [r.request_id for r in busy.held] == ["r1"]


def test_prefetch_hints_walk_the_skipped_queue_then_the_waiting_one():
    pool = Pool()
    skipped = [req("s1", 5)]
    waiting = [req("w1", 1), req("w2", None), req("w3", 2)]
    assert admission_step.prefetch_hints(pool, (skipped, waiting), 2) == ("hints",)
    assert pool.hint_calls == [([(5, "a5", "/adapters/a5"), (1, "a1", "/adapters/a1"),
                                 (2, "a2", "/adapters/a2")], 2, 16)]
