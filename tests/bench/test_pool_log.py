"""Counters of the throughput rows: the pool's log line written by the real scheduler through the
runner's logging config, parsed back; per-trace deltas; the boundary handshake; preemptions."""

from __future__ import annotations

import json
import logging
import logging.config
import time
from types import SimpleNamespace

import pytest

from slora_plugin.bench.pool_log import (
    POOL_KEYS, POOL_LOGGER, PREEMPTION_METRIC, PoolLog, logging_config, parse_pool_lines,
    pool_fields, pool_log_env, preemption_count)


def _stats(loads=0, evictions=0, pages=0, resident=0, preemptions=0):
    return {"pages_total": 500, "pages_free": 500 - pages, "pages_kv": 0, "pages_adapters": pages,
            "adapter_bytes": 4096 * pages, "adapters_resident": resident, "adapters_idle": 0,
            "adapter_loads": loads, "adapter_evictions": evictions, "preemptions": preemptions}


@pytest.fixture
def pool_file_logging(tmp_path):
    """Install the runner's handler for POOL_LOGGER (on a minimal base, so vLLM's own console
    handler in this process is left alone); undo afterwards. vLLM configures logging when first
    imported, which would reset the handlers of its child loggers, so it is imported first."""
    import vllm.logger  # noqa: F401

    path = str(tmp_path / "pool.log")
    logging.config.dictConfig(logging_config({"version": 1, "disable_existing_loggers": False}, path))
    yield path
    lg = logging.getLogger(POOL_LOGGER)
    for h in list(lg.handlers):
        lg.removeHandler(h)
        h.close()
    lg.setLevel(logging.NOTSET)


def test_real_scheduler_line_parses_back(pool_file_logging, tiny_model_dir, monkeypatch):
    from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request

    import slora_plugin.pool.scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "STATS_LOG_INTERVAL_S", 0.0)
    assert sched_mod.logger.name == POOL_LOGGER
    sched = create_scheduler(tiny_model_dir, num_blocks=400, max_loras=8,
                             scheduler_cls=sched_mod.SLoRAScheduler,
                             scheduler_kwargs={"pages_of": lambda lr: (3, f"content-{lr.lora_int_id}")})
    add_requests(sched, [make_request(prompt_len=20, max_tokens=3, lora_request=lora(i)) for i in (1, 2, 3)])
    engine_loop(sched).run()
    lines = parse_pool_lines(open(pool_file_logging).read())
    assert lines and lines[-1] == sched.pool_stats()
    assert lines[-1]["adapter_loads"] == 3 and lines[-1]["pages_adapters"] == 9


def test_parse_skips_other_and_broken_lines():
    text = "\n".join([
        "1.000 slora page pool: " + repr(_stats(loads=1)),
        "1.500 some other message",
        "2.000 slora page pool: {'adapter_loads': ",
        "2.500 slora page pool: [1, 2]",
        "3.000 slora page pool: " + repr(_stats(loads=2)), ""])
    assert [s["adapter_loads"] for s in parse_pool_lines(text)] == [1, 2]


def test_pool_fields_are_deltas_and_sampled_peaks():
    before = _stats(loads=8, evictions=0, pages=40, resident=8, preemptions=1)
    during = [_stats(loads=300, evictions=100, pages=480, resident=210, preemptions=3),
              _stats(loads=600, evictions=450, pages=470, resident=190, preemptions=4)]
    after = _stats(loads=620, evictions=470, pages=100, resident=30, preemptions=4)
    f = pool_fields(before, during, after)
    assert (f["adapter_loads"], f["adapter_evictions"], f["pool_preemptions"]) == (612, 470, 3)
    assert (f["pages_total"], f["adapter_pages_peak"], f["adapters_resident_peak"]) == (500, 480, 210)
    assert f["pool_samples"] == 2
    assert set(POOL_KEYS) <= set(f)
    missing = pool_fields(None, during, after)
    assert all(missing[k] is None for k in POOL_KEYS) and missing["pool_samples"] == 2


def test_boundary_waits_for_a_fresh_line(tmp_path):
    path = tmp_path / "pool.log"
    path.write_text("0.1 slora page pool: " + repr(_stats(loads=1)) + "\n")
    log = PoolLog(str(path), interval_s=0.3)
    pokes = []
    t0 = time.time()

    def poke():  # the scheduler logs again only interval_s after its previous line
        pokes.append(time.time())
        if time.time() - t0 >= 0.25:
            with open(path, "a") as f:
                f.write(f"{time.time():.3f} slora page pool: {_stats(loads=5)!r}\n")

    first, during = log.boundary(poke, poll_s=0.05)
    assert first["adapter_loads"] == 5 and [d["adapter_loads"] for d in during] == [1]
    assert len(pokes) > 1 and path.read_text().count("\n") == 2
    with open(path, "a") as f:
        f.write("9.0 slora page pool: " + repr(_stats(loads=7)) + "\n")   # during the next trace
    second, during = log.boundary(lambda: path.open("a").write("9.5 slora page pool: "
                                                              + repr(_stats(loads=9)) + "\n"))
    assert second["adapter_loads"] == 9 and [d["adapter_loads"] for d in during] == [7]


def test_boundary_gives_up_once_and_then_at_once(tmp_path):
    log = PoolLog(str(tmp_path / "never.log"), interval_s=0.1)
    calls = []
    t = time.time()
    assert log.boundary(lambda: calls.append(1), poll_s=0.02) == (None, [])
    assert 0.1 <= time.time() - t < 5.2 and log.dead
    n = len(calls)
    assert log.boundary(lambda: calls.append(1)) == (None, []) and len(calls) == n


def test_pool_log_env_writes_vllm_default_plus_our_handler(tmp_path, monkeypatch):
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    env = pool_log_env(str(tmp_path / "r" / "x-pool.log"), str(tmp_path / "tmp"))
    assert env["VLLM_LOGGING_CONFIG_PATH"].startswith(str(tmp_path / "tmp"))
    cfg = json.load(open(env["VLLM_LOGGING_CONFIG_PATH"]))
    assert cfg["loggers"]["vllm"] == json.loads(json.dumps(DEFAULT_LOGGING_CONFIG["loggers"]["vllm"]))
    assert cfg["handlers"]["slora_pool_file"]["filename"] == str(tmp_path / "r" / "x-pool.log")
    assert cfg["loggers"][POOL_LOGGER]["propagate"] is True
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    assert pool_log_env(str(tmp_path / "y.log"), str(tmp_path)) is None
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING")
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/elsewhere.json")
    assert pool_log_env(str(tmp_path / "y.log"), str(tmp_path)) is None


def test_preemption_count_from_vllm_metrics():
    from vllm.v1.metrics.reader import Counter, Gauge

    llm = SimpleNamespace(get_metrics=lambda: [
        Gauge(name="vllm:num_requests_running", labels={}, value=3.0),
        Counter(name=PREEMPTION_METRIC, labels={"engine": "0"}, value=4),
        Counter(name=PREEMPTION_METRIC, labels={"engine": "1"}, value=2)])
    assert preemption_count(llm) == 6
    assert preemption_count(SimpleNamespace(get_metrics=lambda: [])) is None

    def disabled():
        raise AssertionError("Stat logging disabled")

    assert preemption_count(SimpleNamespace(get_metrics=disabled)) is None
