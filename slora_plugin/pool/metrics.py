"""Prometheus metrics of the unified page pool, for vLLM's /metrics endpoint.

Why prometheus_client's multiprocess mode and not vLLM's stat-logger path: the pool lives in the
scheduler, in vLLM's engine-core process, while /metrics is served by the API-server process.
`SchedulerStats` crosses that boundary serialized by its declared fields only, so numbers of our
own cannot ride along without patching vLLM's message types. vLLM's /metrics handler, however,
already aggregates the metrics of *every* process whenever `PROMETHEUS_MULTIPROC_DIR` is set
(`vllm.v1.metrics.prometheus.get_prometheus_registry` builds a `MultiProcessCollector` over
that directory; vLLM sets it itself when `--api-server-count` > 1). So the scheduler just updates
ordinary prometheus_client Gauges/Counters in its own process; with the variable set, their
values go to per-process files in the directory and /metrics shows them next to vLLM's own.

prometheus_client picks in-memory or file-backed values once, at its import
(`prometheus_client.values.ValueClass`), from the environment: the variable must be exported,
pointing at an empty directory, before the server starts
(`export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)`). Setting it from inside the plugin is too late
(the plugin loads after prometheus_client), and so is vLLM's own setting for
`--api-server-count` > 1 for the engine core, which is forked (vLLM's default start method) from
a process that imported prometheus_client before the variable existed. Without it the metrics
still exist in the engine-core process (and the pool statistics are still logged), they are just
not on the API server's /metrics; `multiprocess_enabled` says which case holds, and the scheduler
logs it once at start-up. Stale files of an earlier run would add to the counters: use a fresh
directory per run (vLLM warns the same).

Names are `slora:*` rather than `vllm:slora_*`: vLLM unregisters every collector named `vllm:*`
from the global registry when it builds its Prometheus logger
(`vllm.v1.metrics.prometheus.unregister_vllm_metrics`), which would drop ours when the engine
core runs in the API-server process. Labels are vLLM's own (`model_name`, `engine`), so the
series join with vLLM's per-engine metrics.

Per-adapter detail is deliberately not a metric (thousands of adapters would be thousands of
series, and multiprocess files never forget a label set): it is `adapter_residency()` on the
scheduler.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

from prometheus_client import Counter, Gauge, values

#: pool_stats() key -> (metric name, help) for levels (Gauges).
GAUGES: dict[str, tuple[str, str]] = {
    "pages_total": ("slora:pages_total", "KV-cache pages (blocks) shared by KV and adapters."),
    "pages_free": ("slora:pages_free", "Free pages of the unified page pool."),
    "pages_kv": ("slora:pages_kv", "Pages held by request KV (incl. cached prefix blocks)."),
    "pages_adapters": ("slora:pages_adapters", "Pages held by resident adapter weights."),
    "adapter_bytes": ("slora:adapter_bytes", "Device bytes held by resident adapter weights."),
    "adapters_resident": ("slora:adapters_resident", "Adapters whose weights are in the pool."),
    "adapters_idle": ("slora:adapters_idle",
                      "Resident adapters no request uses (evicted first when pages are needed)."),
}
#: pool_stats() key -> (metric name, help) for event counts (Counters; exposed as `<name>_total`).
COUNTERS: dict[str, tuple[str, str]] = {
    "adapter_loads": ("slora:adapter_loads", "Adapters loaded into the page pool."),
    "adapter_evictions": ("slora:adapter_evictions", "Adapters evicted from the page pool."),
    "preemptions": ("slora:preemptions", "Requests preempted by the scheduler."),
    "admission_holds": ("slora:admission_holds",
                        "Request-steps a waiting request was held back because its adapter "
                        "was neither resident nor in pinned host memory yet."),
    "admission_forced": ("slora:admission_forced",
                         "Requests admitted before their adapter's host copy was ready, because "
                         "nothing else could run."),
}
#: Counters that pool_stats() has only in some setups (the worker's host-load waits: only when
#: the worker shares the scheduler's process); published when present.
OPTIONAL_COUNTERS: dict[str, tuple[str, str]] = {
    "host_load_hits": ("slora:host_load_hits",
                       "Adapter loads whose host copy was already in pinned memory."),
    "host_load_waits": ("slora:host_load_waits",
                        "Adapter loads for which the engine step waited for the disk read."),
    "host_load_wait_s": ("slora:host_load_wait_seconds",
                         "Seconds engine steps waited for adapter host copies."),
}
LABELS = ("model_name", "engine")


def multiprocess_enabled() -> bool:
    """Whether this process writes metric values to PROMETHEUS_MULTIPROC_DIR (decided when
    prometheus_client was imported), i.e. whether vLLM's /metrics can see them."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


@functools.cache
def _families() -> tuple[dict[str, Gauge], dict[str, Counter]]:
    """The metric objects, once per process: the global registry refuses a name twice, and
    one process may hold several schedulers (they differ by label)."""
    gauges = {key: Gauge(name, doc, LABELS, multiprocess_mode="mostrecent")
              for key, (name, doc) in GAUGES.items()}
    counters = {key: Counter(name, doc, LABELS)
                for key, (name, doc) in {**COUNTERS, **OPTIONAL_COUNTERS}.items()}
    return gauges, counters


class PoolMetrics:
    """The pool metrics of one scheduler. `update(pool_stats)` is cheap enough for every step:
    it writes only values that changed (a write is an mmap store in multiprocess mode)."""

    def __init__(self, model_name: str, engine: int | str) -> None:
        gauges, counters = _families()
        labels = (str(model_name), str(engine))
        self._gauges = {key: g.labels(*labels) for key, g in gauges.items()}
        self._counters = {key: c.labels(*labels) for key, c in counters.items()}
        self._last: dict[str, int | float] = {}
        self._counted: dict[str, int | float] = {key: 0 for key in self._counters}

    @classmethod
    def for_config(cls, vllm_config: Any) -> "PoolMetrics":
        """Labelled like vLLM's own metrics: served model name, data-parallel engine index."""
        parallel = vllm_config.parallel_config
        engine = getattr(parallel, "data_parallel_index", parallel.data_parallel_rank)
        return cls(vllm_config.model_config.served_model_name, engine)

    def update(self, stats: Mapping[str, int | float]) -> None:
        """Publish `stats` (the scheduler's pool_stats()). Counters take the growth of the
        pool's cumulative counts since the last update; a count that went down is an error.
        Keys of OPTIONAL_COUNTERS may be absent (then not published)."""
        for key, child in self._gauges.items():
            value = stats[key]
            if self._last.get(key) != value:
                child.set(value)
                self._last[key] = value
        for key, child in self._counters.items():
            if key in OPTIONAL_COUNTERS and key not in stats:
                continue
            grown = stats[key] - self._counted[key]
            if grown < 0:
                raise ValueError(f"slora metrics: {key} went down from {self._counted[key]} "
                                 f"to {stats[key]}; it must be a cumulative count")
            if grown:
                child.inc(grown)
                self._counted[key] = stats[key]


def describe_export() -> str:
    """One line for the log: where the metrics can be seen."""
    if multiprocess_enabled():
        return (f"slora:* pool metrics go to PROMETHEUS_MULTIPROC_DIR="
                f"{os.environ.get('PROMETHEUS_MULTIPROC_DIR')} (served on vLLM's /metrics)")
    return ("slora:* pool metrics stay in the engine-core process: set PROMETHEUS_MULTIPROC_DIR "
            "to an empty directory before starting vLLM to see them on /metrics")
