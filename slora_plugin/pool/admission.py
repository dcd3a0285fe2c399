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
    `started`: adapters whose host loads this step asked for (started or already under way).
    """

    held: list[R] = field(default_factory=list)
    later: list[R] = field(default_factory=list)
    forced: R | None = None
    started: int = 0


def plan_admission(waiting: Iterable[R], adapter_of: Callable[[R], tuple[int, str] | None],
                   resident: Callable[[int], bool], readiness: HostReadiness, *, slots: int,
                   start_limit: int, scan_limit: int, idle: bool) -> AdmissionPlan[R]:
    """Split the waiting requests (`waiting`, in the order vLLM considers them) for one step.

    A request is admissible if it has no adapter, or its adapter (`adapter_of`: lora id, path)
    is resident in the page pool or ready on the host. The host loads of the first
    `start_limit` distinct adapters that are not resident start now (a no-op for those ready or
    loading): the same horizon the old prefetch hints had, so the host cache holds at most that
    many adapters ahead of admission instead of thrashing over the whole queue. The scan stops
    after `scan_limit` requests, or once `slots` admissible requests (vLLM cannot start more
    this step) and the start horizon are both covered; what it did not check is `later`.

    Starvation: if `idle` (nothing runs) and no checked request is admissible, the first held
    one is `forced` (admitted; the worker waits for its copy, as without this gate). Otherwise
    running requests finish, or the started loads complete, so held requests are admitted later.
    """
    plan: AdmissionPlan[R] = AdmissionPlan()
    admissible = 0
    verdict: dict[int, bool] = {}  # lora id -> admissible this step
    pending: set[int] = set()  # distinct non-resident adapters seen, in scan order
    it = iter(waiting)
    for scanned, request in enumerate(it):
        if scanned >= scan_limit or (admissible >= slots and len(pending) >= start_limit):
            plan.later.append(request)
            plan.later.extend(it)
            break
        adapter = adapter_of(request)
        if adapter is None:
            admissible += 1
            continue
        lora_id, path = adapter
        ok = verdict.get(lora_id)
        if ok is None:
            ok = resident(lora_id)
            if not ok:
                ok = readiness.ready(path)
                if not ok and len(pending) < start_limit:
                    readiness.start(path)
                    plan.started += 1
                pending.add(lora_id)
            verdict[lora_id] = ok
        if ok:
            admissible += 1
        else:
            plan.held.append(request)
    if idle and admissible == 0 and plan.held:
        plan.forced = plan.held.pop(0)
    return plan
