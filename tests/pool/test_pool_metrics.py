"""The page pool's Prometheus metrics: what vLLM's /metrics reads equals the scheduler's
pool_stats(), across processes (prometheus_client multiprocess mode, as vLLM aggregates it) and
in one process (the global registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tiny_model import write_model_config
from slora_plugin.pool.metrics import COUNTERS, GAUGES, PoolMetrics, multiprocess_enabled
from slora_plugin.pool.scheduler import scheduler_class
from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request

TESTS = Path(__file__).resolve().parents[1]

#: Drives the real scheduler through adapter loads, evictions and preemptions; prints the
#: labels and pool_stats() as JSON on its last line. Run in a fresh interpreter because
#: prometheus_client reads PROMETHEUS_MULTIPROC_DIR once, at import.
SCENARIO = textwrap.dedent("""
    import json, sys
    from tiny_model import write_model_config
    from slora_plugin.pool.metrics import multiprocess_enabled
    from slora_plugin.pool.scheduler import scheduler_class
    from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request

    assert multiprocess_enabled()
    sched = create_scheduler(write_model_config(sys.argv[1]), num_blocks=40,
                             async_scheduling=True, scheduler_cls=scheduler_class(True),
                             scheduler_kwargs={"pages_of": lambda lr: (6, "c")})
    loop = engine_loop(sched)
    add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in (1, 2, 3)])
    loop.run()
    add_requests(sched, [make_request(440, 2)])  # needs the pages of two idle adapters
    loop.run()
    add_requests(sched, [make_request(prompt_token_ids=[200 + i] * 100, max_tokens=300,
                                      lora_request=lora(4)) for i in range(4)])
    for _ in range(100):  # mid-run: KV outgrows the pool, requests are preempted
        loop.step()
    labels = {"model_name": sched.vllm_config.model_config.served_model_name, "engine": "0"}
    print(json.dumps({"labels": labels, "stats": sched.pool_stats()}))
""")


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def assert_exported(registry: CollectorRegistry, labels: dict[str, str], stats: dict) -> None:
    got = {key: sample(registry, name, labels) for key, (name, _) in GAUGES.items()}
    got |= {key: sample(registry, f"{name}_total", labels) for key, (name, _) in COUNTERS.items()}
    assert got == {key: float(stats[key]) for key in got}


def test_engine_core_metrics_reach_the_api_server_registry(tmp_path):
    """The scheduler runs in one process with PROMETHEUS_MULTIPROC_DIR set (as vLLM's engine
    core inherits it); this process reads the directory the way vLLM's /metrics does."""
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "model")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = result["stats"]
    assert stats["adapter_loads"] == 4 and stats["adapter_evictions"] >= 2
    assert stats["preemptions"] > 0 and stats["pages_adapters"] > 0 and stats["pages_kv"] > 0
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    assert_exported(registry, result["labels"], stats)


@pytest.mark.skipif(multiprocess_enabled(), reason="reads the in-memory global registry")
def test_in_process_metrics_follow_every_step(tmp_path):
    sched = create_scheduler(write_model_config(str(tmp_path)), num_blocks=40,
                             scheduler_cls=scheduler_class(False),
                             scheduler_kwargs={"pages_of": lambda lr: (6, "c")})
    labels = {"model_name": sched.vllm_config.model_config.served_model_name, "engine": "0"}
    loop = engine_loop(sched)
    add_requests(sched, [make_request(16, 4, lora_request=lora(i)) for i in (1, 2)])
    loop.step()
    assert sched.pool_stats()["adapters_resident"] == 2
    assert_exported(REGISTRY, labels, sched.pool_stats())
    loop.run()
    assert sched.pool_stats()["adapters_idle"] == 2
    assert_exported(REGISTRY, labels, sched.pool_stats())


def test_no_metrics_without_log_stats(tmp_path):
    sched = create_scheduler(write_model_config(str(tmp_path)), num_blocks=40, log_stats=False,
                             scheduler_cls=scheduler_class(False),
                             scheduler_kwargs={"pages_of": lambda lr: (6, "c")})
    assert sched.pool_metrics is None


def test_a_cumulative_count_that_goes_down_is_an_error():
    metrics = PoolMetrics("test-count-down", 0)
    stats = {key: 0 for key in (*GAUGES, *COUNTERS)}
    metrics.update({**stats, "adapter_loads": 3})
    with pytest.raises(ValueError, match="adapter_loads went down from 3 to 1"):
        metrics.update({**stats, "adapter_loads": 1})
