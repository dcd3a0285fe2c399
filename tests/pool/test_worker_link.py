"""The worker -> scheduler link in one process: blocking host-load counts reach pool_stats(),
the Prometheus counters and the throughput rows; without a worker in the process, nothing
pretends to know them."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import REGISTRY

from slora_plugin.bench.pool_log import pool_fields
from slora_plugin.pool.metrics import OPTIONAL_COUNTERS, PoolMetrics, multiprocess_enabled
from slora_plugin.pool.scheduler import scheduler_class
from slora_plugin.pool.worker_link import (HostLoadWaits, WorkerLink, engine_key, lookup,
                                           publish)
from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request


class Ready:
    def ready(self, path: str) -> bool:
        return True

    def start(self, path: str) -> None:
        pass

    def error(self, path: str) -> None:
        return None


def test_waits_count_hits_and_blocking_loads():
    waits = HostLoadWaits()
    for s in (0.0, 0.5, 0.0, 0.25):
        waits.record(s)
    assert waits.snapshot() == {"host_load_hits": 2, "host_load_waits": 2,
                                "host_load_wait_s": 0.75}
    with pytest.raises(ValueError, match="waited_s must be >= 0"):
        waits.record(-1.0)


def test_links_are_per_engine_and_weak():
    link = WorkerLink(Ready(), HostLoadWaits())
    publish("engine-a", link)
    assert lookup("engine-a") is link and lookup("engine-b") is None
    del link
    gc.collect()
    assert lookup("engine-a") is None  # the registry does not keep a worker's cache alive
    with pytest.raises(ValueError, match="VllmConfig"):
        engine_key(None)


def test_the_key_survives_vllm_re_running_post_init(tiny_model_dir):
    """vLLM's engine core re-runs VllmConfig.__post_init__ after its handshake, which draws a
    new instance_id: the worker published before that, the scheduler looks up after."""
    from vllm_cpu import build_vllm_config

    vc = build_vllm_config(tiny_model_dir)
    key, old_id = engine_key(vc), vc.instance_id
    vc.__post_init__()
    assert vc.instance_id != old_id and engine_key(vc) == key


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_pool_stats_carry_the_workers_waits_only_when_it_is_here(tiny_model_dir,
                                                                 async_scheduling):
    sched = create_scheduler(tiny_model_dir, num_blocks=64, async_scheduling=async_scheduling,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (2, "c")})
    assert "host_load_waits" not in sched.pool_stats()
    link = WorkerLink(Ready(), HostLoadWaits())
    publish(engine_key(sched.vllm_config), link)
    link.waits.record(0.125)
    add_requests(sched, [make_request(16, 2, lora_request=lora(1))])
    engine_loop(sched).run()
    stats = sched.pool_stats()
    assert (stats["host_load_hits"], stats["host_load_waits"], stats["host_load_wait_s"]) == (
        0, 1, 0.125)


@pytest.mark.skipif(multiprocess_enabled(), reason="reads the in-memory global registry")
def test_optional_counters_are_published_when_present():
    metrics = PoolMetrics("test-host-waits", 0)
    base = {"pages_total": 10, "pages_free": 10, "pages_kv": 0, "pages_adapters": 0,
            "adapter_bytes": 0, "adapters_resident": 0, "adapters_idle": 0, "adapter_loads": 0,
            "adapter_evictions": 0, "preemptions": 0, "admission_holds": 0, "admission_forced": 0}
    labels = {"model_name": "test-host-waits", "engine": "0"}
    name = OPTIONAL_COUNTERS["host_load_wait_s"][0] + "_total"
    metrics.update(base)  # absent: not published, no error
    assert REGISTRY.get_sample_value(name, labels) == 0.0
    metrics.update({**base, "host_load_hits": 3, "host_load_waits": 2, "host_load_wait_s": 1.5})
    metrics.update({**base, "host_load_hits": 4, "host_load_waits": 2, "host_load_wait_s": 1.5})
    assert REGISTRY.get_sample_value(name, labels) == 1.5
    assert REGISTRY.get_sample_value("slora:host_load_hits_total", labels) == 4.0
    with pytest.raises(ValueError, match="host_load_wait_s went down"):
        metrics.update({**base, "host_load_hits": 4, "host_load_waits": 2, "host_load_wait_s": 1.0})


def test_rows_get_the_growth_of_the_waits_over_their_trace():
    line = {"pages_total": 9, "pages_adapters": 1, "adapters_resident": 1, "adapter_loads": 1,
            "adapter_evictions": 0, "preemptions": 0}
    before = {**line, "host_load_hits": 1, "host_load_waits": 2, "host_load_wait_s": 0.5}
    after = {**line, "host_load_hits": 4, "host_load_waits": 7, "host_load_wait_s": 2.25}
    row = pool_fields(before, [], after)
    assert (row["host_load_hits"], row["host_load_waits"], row["host_load_wait_s"]) == (3, 5, 1.75)
    row = pool_fields(line, [], line)  # the worker in another process: unknown, not 0
    assert row["host_load_waits"] is None and row["host_load_wait_s"] is None


def test_the_link_log_line_says_whether_admission_waits():
    from slora_plugin.pool.worker_link import describe_link

    assert "admission_by_host_readiness is off" in describe_link(False, True)
    assert describe_link(False, True) == describe_link(False, False)
    assert describe_link(True, True) == ("admission waits for host copies: the worker shares "
                                         "this process")
    assert describe_link(True, False).startswith("no worker in this process")
