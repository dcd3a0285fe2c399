"""Admission by adapter bytes: which waiting requests may join the batch when steps are bytes-bound.

Objective. A decode step reads the base weights once, the KV of every running sequence, and
every *distinct* adapter of the batch once (`slora_plugin/roofline.py`). A waiting request whose
adapter already runs adds its tokens to every step for the price of its KV; one whose adapter is
new to the batch adds that adapter's bytes to every step while any request of it runs. With many
heavy adapters (the throughput benchmark at 1,000 adapters carries ~130 distinct adapters per
step, 13.8 GB of adapter bytes against 13.2 GB of base weights) the steps are bytes-bound, and
tokens per byte rise when the batch is filled from the adapters already in it. The policy admits
to maximise tokens per byte while no request waits for it without bound.

When it helps: only when waiting requests share adapters, so that holding a new adapter back
lets requests of the batch's adapters fill the slots instead. With one request per adapter it
only shrinks the batch, and a step of B sequences moves about W + B x a bytes (W base weights and
KV, a per adapter) for B tokens, so tokens per byte fall; the budget then trades throughput for
shorter steps (lower TPOT). `benchmarks/admission_sim.py` models both cases (a model, not a
measurement).

Rule (`plan_budget`, one walk over the waiting requests in the order vLLM considers them):

- the batch's adapters are those of the running requests, `used` bytes their sum (each once);
- a request without an adapter, or whose adapter is already in the batch (running, or admitted
  earlier in this walk), is admissible: it adds no adapter bytes;
- a request whose adapter is new is admissible while `used + its bytes <= budget_bytes`, or when
  the batch has no adapter yet (so that a budget smaller than one adapter cannot stop the engine);
  its adapter then joins the batch and `used` grows;
- otherwise it is *held* for this step (vLLM does not see it), unless it was already held in
  `max_wait_steps` earlier steps: then it is *starving* and admissible past the budget;
- the walk covers the whole queue (a request deep in it whose adapter is in the batch is
  exactly what the policy looks for), and everything it leaves visible fits the budget together,
  so whichever of them vLLM admits (it stops at `slots`, KV memory or `max_loras`) fits too.
  With a budget nothing reaches, nothing is held and vLLM admits exactly what it would without
  the policy.

So among the requests that have no slot yet, those of the batch's adapters go first, and a new
adapter comes in, in FCFS order, whenever the budget has room (finished requests free it).

Bounded waiting. A held request counts a step (`held_steps`, per request, across steps) only if
it was within reach: among the first `slots` waiting requests, so that without the policy it
could have started. Once it has counted `max_wait_steps` it is *starving* and
admissible past the budget. So the policy delays a request by at most `max_wait_steps` steps
beyond what it would wait anyway (a slot, KV memory, vLLM's `max_loras`); a request deep in
the queue is not charged for steps it could not have started in, or the whole queue would turn
starving together and the policy would fall back to plain FCFS. Held requests keep their place:
they go back to the front of vLLM's skipped queue in their order (`patches/scheduler.hide`),
so they are considered first next step.

Cost: one walk over the waiting queue per step, one dictionary look-up per request (adapter
sizes are kept by lora id): 1.4 ms for 1,000 waiting and 256 running requests on the shared
development CPU (plain objects), plus vLLM's removal of the held ones from its queues.

Budget. `budget_bytes` is `slora.adapter_bytes_per_step_budget` (a fraction) times the bytes of
the base weights a step reads (`ModelBytes.weight_bytes_per_step`): at 0.5 a step's adapters may
add half the base model's weights. An adapter's bytes are its pages in the pool (pages x bytes per
page: its real-rank weights, rounded up to pages). Off (None) by default: then none of this runs
and the scheduler admits exactly as before.

Interactions. vLLM's FCFS (or priority) order is kept among the requests vLLM sees; the policy
only hides some of them for a step. vLLM's own `max_loras` (`slora.max_adapters_per_step`) still
applies after it. Admission by host readiness (`admission.py`) runs first; this walk runs over
the requests it left visible. Prefix caching is not weighed: a prefix hit saves prefill, not
the adapter's per-step bytes (a held request's cached blocks may be evicted meanwhile, as any
waiting request's). A preempted request is back among the waiting ones, usually with its
adapter still in the batch, so it is readmitted first at no adapter cost; one whose adapter left
the batch is weighed like any new one, and its held steps count as for any request.

No vLLM import: the glue (`pool/scheduler.py`) gives plain callables; tests use plain objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Container, Generic, Hashable, Iterable, Sequence, TypeVar

from slora_plugin.pool.page_pool import AdapterNeed, PagePool
from slora_plugin.pool.unusable import AdapterUnusable

R = TypeVar("R")


@dataclass
class BudgetPlan(Generic[R]):
    """One step's split. `held`: refused by the budget (in consideration order; vLLM must not
    see them this step); `starving`: admissible only because they had been held
    `max_wait_steps` steps; `adapter_bytes`: the batch's adapter bytes if every admissible
    request is admitted; `adapters`: the batch's distinct adapters then."""

    held: list[R] = field(default_factory=list)
    starving: int = 0
    adapter_bytes: int = 0
    adapters: int = 0


def plan_budget(waiting: Iterable[R], adapter_of: Callable[[R], int | None],
                bytes_of: Callable[[R], int], running_adapters: Iterable[tuple[int, int]], *,
                budget_bytes: int, slots: int, max_wait_steps: int,
                held_steps: dict[Hashable, int], key: Callable[[R], Hashable]) -> BudgetPlan[R]:
    """Split `waiting` (in vLLM's order) for one step (module docstring).

    `adapter_of`: a request's adapter id (None: no adapter); `bytes_of`: the bytes of its adapter
    (asked once per new adapter and step); `running_adapters`: (id, bytes) of the adapters of the
    running requests (repeats are counted once). `held_steps` (request key -> steps held so far)
    is updated in place: a held request among the first `slots` counts one more step, a starving
    one keeps its count (vLLM may still leave it waiting, for a slot or KV memory), any other
    admissible one drops out.
    """
    in_batch: set[int] = set()
    used = 0
    for lora_id, nbytes in running_adapters:
        if lora_id not in in_batch:
            in_batch.add(lora_id)
            used += nbytes
    plan: BudgetPlan[R] = BudgetPlan()
    sizes: dict[int, int] = {}  # adapter id -> bytes, asked once per step
    for position, request in enumerate(waiting):
        k = key(request)
        lora_id = adapter_of(request)
        if lora_id is not None and lora_id not in in_batch:
            nbytes = sizes.get(lora_id)
            if nbytes is None:
                nbytes = sizes[lora_id] = bytes_of(request)
            if in_batch and used + nbytes > budget_bytes:
                waited = held_steps.get(k, 0)
                if waited < max_wait_steps:
                    if position < slots:  # within reach: without the policy it could start
                        held_steps[k] = waited + 1
                    plan.held.append(request)
                    continue
                plan.starving += 1  # keeps its count: starving until vLLM admits it
                in_batch.add(lora_id)
                used += nbytes
                continue
            in_batch.add(lora_id)
            used += nbytes
        held_steps.pop(k, None)
    plan.adapter_bytes = used
    plan.adapters = len(in_batch)
    return plan


class AdapterBytesBudget:
    """The policy's state across steps in the scheduler: the budget, the bound, each waiting
    request's held steps, adapter sizes, and counters. Reads vLLM's requests by attribute
    (`request_id`, `lora_request.lora_int_id`), as `admission_step` does; no vLLM import.

    `adapter_bytes(request)`: the bytes of the request's adapter (`pool_adapter_bytes`); asked
    once per adapter, then kept by lora id (an adapter replaced on disk keeps its old size
    here; only the budget's accounting is affected, the pool reloads it as before)."""

    def __init__(self, budget_bytes: int, max_wait_steps: int,
                 adapter_bytes: Callable[[Any], int]) -> None:
        self.budget_bytes = budget_bytes
        self.max_wait_steps = max_wait_steps
        self.held_steps: dict[Hashable, int] = {}
        self._adapter_bytes = adapter_bytes
        self._sizes: dict[int, int] = {}
        #: request-steps held by the budget, and request-steps starving requests were let past it
        #: (one left waiting by vLLM, for a slot or KV memory, counts again next step)
        self.holds = 0
        self.starving = 0

    def bytes_of(self, request: Any) -> int:
        lora_id = request.lora_request.lora_int_id
        size = self._sizes.get(lora_id)
        if size is None:
            size = self._adapter_bytes(request)
            if size:  # an unusable adapter (0) is asked again: it may be fixed
                self._sizes[lora_id] = size
        return size

    def plan(self, waiting: Sequence[Any], running: Iterable[Any], *, slots: int,
             alive: Container[Hashable]) -> BudgetPlan[Any]:
        """`plan_budget` over vLLM's waiting requests (in its order) with the `running` ones'
        adapters as the batch; `alive`: the ids of requests not finished. The held counts of
        finished and running requests are dropped."""
        for k in [k for k in self.held_steps if k not in alive]:
            del self.held_steps[k]
        batch = {}
        for r in running:
            self.held_steps.pop(r.request_id, None)
            if r.lora_request is not None:
                batch[r.lora_request.lora_int_id] = r
        plan = plan_budget(waiting, _lora_id, self.bytes_of,
                           ((i, self.bytes_of(r)) for i, r in batch.items()),
                           budget_bytes=self.budget_bytes, slots=slots,
                           max_wait_steps=self.max_wait_steps, held_steps=self.held_steps,
                           key=_request_id)
        self.holds += len(plan.held)
        self.starving += plan.starving
        return plan


def pool_adapter_bytes(pool: PagePool, need_of: Callable[[Any], AdapterNeed | None],
                       bytes_per_page: int) -> Callable[[Any], int]:
    """A request's adapter bytes as the pool holds them: its pages (resident, else as
    `need_of`, the KV cache manager's `adapter_need`, plans them) x bytes per page. An unusable
    adapter counts 0: its request is finished with an error when vLLM tries to admit it."""

    def adapter_bytes(request: Any) -> int:
        entry = pool.resident(request.lora_request.lora_int_id)
        if entry is not None:
            return entry.need.num_pages * bytes_per_page
        try:
            need = need_of(request)
        except AdapterUnusable:
            return 0
        return 0 if need is None else need.num_pages * bytes_per_page

    return adapter_bytes


def _lora_id(request: Any) -> int | None:
    lr = request.lora_request
    return None if lr is None else lr.lora_int_id


def _request_id(request: Any) -> Hashable:
    return request.request_id


def budget_bytes(fraction: float, base_weight_bytes: int) -> int:
    """`slora.adapter_bytes_per_step_budget` in bytes: that fraction of the base weights' bytes."""
    return int(fraction * base_weight_bytes)
