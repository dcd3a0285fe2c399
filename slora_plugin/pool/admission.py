"""Admission by host readiness: which waiting requests vLLM may consider in a step.

Loading an adapter the scheduler admitted is part of the step that runs it: the worker copies
the adapter's pinned host copy to its pages before the forward. When that host copy is not
there yet, the worker reads the adapter from disk first (16-268 MB for Llama-2-7B ranks 8-128 at
4-7 GB/s) and the whole batch waits. S-LoRA admits a request only once its adapter is ready on
the host; so does this module, with the worker's host store as the oracle (`HostReadiness`).

No vLLM import: the vLLM glue (`pool/scheduler.py`, `patches/scheduler.py`) feeds the waiting
requests in the order vLLM considers them and applies the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Protocol, TypeVar

R = TypeVar("R")


class HostReadiness(Protocol):
    """The worker's host adapter store as the scheduler sees it (`AdapterStore` is one; tests
    use fakes). `path` is the adapter's `LoRARequest.lora_path`. Both calls must be cheap
    (no file-system access once an adapter is known): they run for waiting requests every step."""

    def ready(self, path: str) -> bool:
        """Whether the worker can load the adapter without waiting for the disk (its pinned
        copy is there, or its load failed and the worker's get raises at once)."""

    def start(self, path: str) -> None:
        """Start reading the adapter into pinned memory now (no-op when ready or loading)."""

    def error(self, path: str) -> str | None:
        """Why the adapter cannot be loaded, when that is known (its load failed); else None."""


@dataclass
class AdmissionPlan(Generic[R]):
    """What vLLM's waiting loop may see this step (the glue hides the rest, then puts it back).

    `held`: checked and not ready; not admitted this step (vLLM's skip: to the front of the
    skipped queue). `later`: not checked this step (beyond the scan); they keep their places.
    `forced`: not ready, admitted anyway because nothing runs and nothing else could start.
    `failed`: (request, reason) for requests whose adapter's host load is known to have failed
    (`HostReadiness.error`); in none of the other lists: the glue finishes them with the reason.
    `started`: adapters whose host loads this step asked for (started or already under way).
    """

    held: list[R] = field(default_factory=list)
    later: list[R] = field(default_factory=list)
    forced: R | None = None
    failed: list[tuple[R, str]] = field(default_factory=list)
    started: int = 0


def plan_admission(waiting: Iterable[R], adapter_of: Callable[[R], tuple[int, str] | None],
                   resident: Callable[[int], bool], readiness: HostReadiness, *, slots: int,
                   start_limit: int, scan_limit: int, idle: bool) -> AdmissionPlan[R]:
    """Split the waiting requests (`waiting`, in the order vLLM considers them) for one step.

    Failed loads first: a request among the first `scan_limit` (or among those split below)
    whose adapter (`adapter_of`: lora id, path) has a known host-load error, resident or not, is
    `failed`; the split below runs over the others, as if the failed ones had been taken out of
    the queue before.

    A request is admissible if it has no adapter, or its adapter is resident in the page pool
    or ready on the host. The host loads of the first `start_limit` distinct adapters that are
    not resident start now (a no-op for those ready or loading): the same horizon the old
    prefetch hints had, so the host cache holds at most that many adapters ahead of admission
    instead of thrashing over the whole queue. The scan stops after `scan_limit` requests, or
    once `slots` admissible requests (vLLM cannot start more this step) and the start horizon
    are both covered; what it did not check is `later`.

    Cost: this runs every step over a queue that is ~1,000 long in the throughput benchmark, so
    the queue is walked once and each oracle call is made once per adapter and step.

    Starvation: if `idle` (nothing runs) and no checked request is admissible, the first held
    one is `forced` (admitted; the worker waits for its copy, as without this gate). Otherwise
    running requests finish, or the started loads complete, so held requests are admitted later.
    """
    plan: AdmissionPlan[R] = AdmissionPlan()
    admissible = 0
    scanned = 0  # requests split (failed ones not counted)
    verdict: dict[int, object] = {}  # lora id -> admissible this step (truthy), or _FAILED
    reasons: dict[int, str] = {}  # lora id -> its known host-load error
    pending: set[int] = set()  # distinct non-resident adapters seen, in scan order
    it = iter(waiting)
    for position, request in enumerate(it):
        if scanned >= scan_limit or (admissible >= slots and len(pending) >= start_limit):
            _split_rest(plan, [request, *it], max(0, scan_limit - position), adapter_of,
                        readiness, verdict, reasons)
            break
        adapter = adapter_of(request)
        if adapter is None:
            scanned += 1
            admissible += 1
            continue
        lora_id, path = adapter
        v = verdict.get(lora_id)
        if v is None:
            reason = readiness.error(path) if position < scan_limit else None
            if reason:
                reasons[lora_id] = reason
                v = _FAILED
            else:
                v = resident(lora_id)
                if not v:
                    v = readiness.ready(path)
                    if not v and len(pending) < start_limit:
                        readiness.start(path)
                        plan.started += 1
                    pending.add(lora_id)
            verdict[lora_id] = v
        if v is _FAILED:
            plan.failed.append((request, reasons[lora_id]))
            continue
        scanned += 1
        if v:
            admissible += 1
        else:
            plan.held.append(request)
    if idle and admissible == 0 and plan.held:
        plan.forced = plan.held.pop(0)
    return plan


#: The verdict of an adapter whose host load is known to have failed.
_FAILED = object()


def _split_rest(plan: AdmissionPlan[R], rest: list[R], num_checked: int,
                adapter_of: Callable[[R], tuple[int, str] | None], readiness: HostReadiness,
                verdict: dict[int, object], reasons: dict[int, str]) -> None:
    """The requests past the split are `later`, except those of the first `num_checked` whose
    adapter has a known host-load error (`failed`)."""
    later = plan.later
    for request in rest[:num_checked]:
        adapter = adapter_of(request)
        if adapter is not None:
            lora_id = adapter[0]
            v = verdict.get(lora_id)
            if v is None:  # not seen in the split: only its error matters
                reason = readiness.error(adapter[1])
                if reason:
                    reasons[lora_id] = reason
                v = verdict[lora_id] = _FAILED if reason else False
            if v is _FAILED:
                plan.failed.append((request, reasons[lora_id]))
                continue
        later.append(request)
    later.extend(rest[num_checked:])
