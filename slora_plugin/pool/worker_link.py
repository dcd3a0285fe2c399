"""What a worker shares with the scheduler when both run in one process.

With tensor parallelism 1, vLLM's engine core runs the scheduler and the only worker in one
process (`UniProcExecutor`, the same `VllmConfig` object). The worker then publishes here, under
the engine's `VllmConfig` object (`engine_key`), two things the scheduler can use directly:

- its host adapter store as a readiness oracle (`pool.admission.HostReadiness`): the scheduler
  admits a request only when its adapter's host copy is ready, and starts the host loads itself,
  at once, instead of sending prefetch hints the worker would apply a step later;
- the worker's count of blocking host loads (`HostLoadWaits`): how often, and for how long, a
  step waited for an adapter's disk read; the scheduler adds it to `pool_stats()`;
- the loads that failed in the worker (`LoadFailures`), whose requests the scheduler fails.

With workers in other processes (multiprocessing executor) nothing is published in the
scheduler's process: `lookup` returns None, admission does not wait for host copies (the
worker blocks as before; prefetch hints still go out) and `pool_stats()` has no `host_load_*`
keys. Nothing here crosses a process boundary, so nothing here can be stale or wrong across one.

Entries are weak: the registry never keeps a worker's pinned host cache alive.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from slora_plugin.pool.admission import HostReadiness


class HostLoadWaits:
    """Cumulative counts of the worker's adapter loads by whether the step had to wait for the
    host copy. Written by the engine thread, read by the scheduler (same or another thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits = 0
        self._waits = 0
        self._wait_s = 0.0

    def record(self, waited_s: float) -> None:
        """One load; `waited_s` is how long getting its host copy blocked (0.0: it was ready)."""
        if waited_s < 0:
            raise ValueError(f"waited_s must be >= 0, got {waited_s}")
        with self._lock:
            if waited_s > 0:
                self._waits += 1
                self._wait_s += waited_s
            else:
                self._hits += 1

    def snapshot(self) -> dict[str, int | float]:
        """`host_load_hits` (copy was ready), `host_load_waits` (the step waited),
        `host_load_wait_s` (seconds waited in all)."""
        with self._lock:
            return {"host_load_hits": self._hits, "host_load_waits": self._waits,
                    "host_load_wait_s": round(self._wait_s, 6)}


class LoadFailures:
    """Adapters whose load failed in the worker after the scheduler admitted them (their
    weights turned out unreadable, or the host cache could not hold them): lora id -> reason.
    The worker adds, the scheduler takes them and fails the adapters' requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: dict[int, str] = {}

    def add(self, lora_id: int, reason: str) -> None:
        with self._lock:
            self._failed[lora_id] = reason

    def take(self) -> dict[int, str]:
        with self._lock:
            out, self._failed = self._failed, {}
            return out


@dataclass(eq=False)
class WorkerLink:
    """What one worker publishes: its readiness oracle, its wait counts and its failed loads."""

    readiness: HostReadiness
    waits: HostLoadWaits
    failures: LoadFailures = field(default_factory=LoadFailures)


_lock = threading.Lock()
_links: "weakref.WeakValueDictionary[str, WorkerLink]" = weakref.WeakValueDictionary()


def engine_key(vllm_config: Any) -> str:
    """The key of one engine: the identity of the `VllmConfig` object its scheduler and its
    worker share (`UniProcExecutor` passes the engine core's object to the worker).

    Not `VllmConfig.instance_id`: the engine core re-runs `VllmConfig.__post_init__` after its
    start-up handshake (vllm/v1/engine/core.py), which draws a new id after the worker has
    published (seen on the H100: the worker and the scheduler of one process had different ids).
    The object itself is mutated in place, so its identity holds for the engine's lifetime."""
    if vllm_config is None:
        raise ValueError("engine_key needs the engine's VllmConfig, got None")
    return f"vllm-config-{id(vllm_config):x}"


def publish(key: str, link: WorkerLink) -> None:
    """Publish `link` for the engine `key`; the caller keeps it alive (held weakly here)."""
    with _lock:
        _links[key] = link


def lookup(key: str) -> WorkerLink | None:
    """The link a worker of engine `key` published in this process, if any."""
    with _lock:
        return _links.get(key)


def describe_link(gated: bool, linked: bool) -> str:
    """The scheduler's one log line about admission and the worker link: whether admission
    waits for host copies (`gated`: `slora.admission_by_host_readiness`; `linked`: a worker
    published in this process)."""
    if not gated:
        return "admission does not wait for host copies (admission_by_host_readiness is off)"
    if linked:
        return "admission waits for host copies: the worker shares this process"
    return "no worker in this process: admission does not wait for host copies"
