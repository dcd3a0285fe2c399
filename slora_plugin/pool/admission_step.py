"""The scheduler's host-load decisions of one step, before vLLM's waiting loop runs.

Three cases (see `pool/scheduler.py` for when each holds):

- admission by host readiness on (`step_readiness` gives an oracle): one walk over the waiting
  queue (`plan_step`, i.e. `admission.plan_admission`) fails the requests whose adapter's host
  load is known to have failed, starts the host loads of queued adapters and says which
  requests vLLM must not see this step;
- off, with an oracle in this process (`host_oracle`): every request is admitted as it comes,
  but the waiting requests whose adapter's host load is known to have failed are found first
  (`known_failed`), so they are never admitted;
- either way without an oracle: the workers read queued adapters ahead from the step's prefetch
  hints (`prefetch_hints`).

No vLLM import: the glue passes the waiting requests in the order vLLM considers them
(`patches/scheduler.waiting_in_order`) and vLLM's queues as plain iterables; requests and LoRA
requests are read by attribute (`lora_request`; `lora_int_id`, `lora_name`, `lora_path`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from slora_plugin.config import SLoRAConfig
from slora_plugin.pool.admission import AdmissionPlan, HostReadiness, plan_admission
from slora_plugin.pool.page_pool import PagePool
from slora_plugin.pool.worker_link import WorkerLink

R = TypeVar("R")


def scan_limit(max_running: int, prefetch_depth: int) -> int:
    """How many waiting requests one step checks at most (admission walk and failed loads)."""
    return 2 * max_running + 8 * prefetch_depth


def host_oracle(host_readiness: HostReadiness | None,
                link: Callable[[], WorkerLink | None]) -> HostReadiness | None:
    """The host store's view: an explicit `host_readiness=`, else the worker's store when the
    worker shares this process (`link` looks it up; called only when needed)."""
    if host_readiness is not None:
        return host_readiness
    found = link()
    return found.readiness if found is not None else None


def step_readiness(cfg: SLoRAConfig, host_readiness: HostReadiness | None,
                   link: Callable[[], WorkerLink | None]) -> HostReadiness | None:
    """The oracle admission waits on: an explicit `host_readiness=`, else the worker's store
    when `slora.admission_by_host_readiness` is on and the worker shares this process; None
    (admit as vLLM would, prefetch by hints) otherwise."""
    if cfg.prefetch_depth == 0:
        return None  # no host loads ahead of admission: nothing to wait for
    if host_readiness is None and not cfg.admission_by_host_readiness:
        return None
    return host_oracle(host_readiness, link)


def known_failed(waiting: Sequence[R], oracle: HostReadiness, limit: int) -> list[tuple[R, str]]:
    """Without the admission gate: (request, reason) for the first `limit` waiting requests
    whose adapter's host load is known to have failed (their load would fail in the worker, and
    the step before the scheduler learns of it would run them without their weights). One
    `error` call per adapter; the reason is an AdapterError's text (adapter, file, why)."""
    errors: dict[int, str | None] = {}
    failed: list[tuple[R, str]] = []
    for request in waiting[:limit]:
        lr = request.lora_request  # type: ignore[attr-defined]
        if lr is None:
            continue
        if lr.lora_int_id not in errors:
            errors[lr.lora_int_id] = oracle.error(lr.lora_path)
        reason = errors[lr.lora_int_id]
        if reason:
            failed.append((request, reason))
    return failed


def adapter_of(request: Any) -> tuple[int, str] | None:
    """(lora id, path) of a request's adapter, as `plan_admission` wants it."""
    lr = request.lora_request
    return None if lr is None else (lr.lora_int_id, lr.lora_path)


def plan_step(waiting: Iterable[R], pool: PagePool, readiness: HostReadiness, *,
              max_running: int, num_running: int, prefetch_depth: int) -> AdmissionPlan[R]:
    """The admission walk of one step over `waiting` (in vLLM's order), with `num_running`
    requests running: see `admission.plan_admission`."""
    return plan_admission(
        waiting, adapter_of, lambda lora_id: pool.resident(lora_id) is not None, readiness,
        slots=max_running - num_running, start_limit=prefetch_depth,
        scan_limit=scan_limit(max_running, prefetch_depth), idle=not num_running)


def prefetch_hints(pool: PagePool, queues: Iterable[Iterable[Any]],
                   depth: int) -> tuple[tuple[str, str], ...]:
    """(name, path) of up to `depth` adapters of the requests in `queues` (vLLM's skipped and
    waiting queues, in that order) for the workers to read ahead: see `PagePool.prefetch_hints`."""

    def queued() -> Iterator[tuple[int, str, str]]:
        for queue in queues:
            for request in queue:
                lr = request.lora_request
                if lr is not None:
                    yield lr.lora_int_id, lr.lora_name, lr.lora_path

    return pool.prefetch_hints(queued(), depth, scan_limit=8 * depth)
