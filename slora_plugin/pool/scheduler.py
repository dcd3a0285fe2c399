"""vLLM glue of the unified page pool: the scheduler subclasses and their KV cache manager.

vLLM 0.26 uses a custom scheduler class as given, so there is one subclass of each of its two
schedulers (`Scheduler`, and `AsyncScheduler`, the default). With the plugin on,
`SchedulerConfig.scheduler_cls` is set to the dotted name of one of them
(`patches/engine_args.SCHEDULER_CLS`, which must not import this module);
`scheduler_class(async_scheduling)` gives the class itself to code that builds a scheduler
directly (the CPU tests' real vLLM scheduler).

The residency logic itself is `page_pool.PagePool`, and the rest of what the scheduler decides
needs no vLLM either: which requests have an unusable adapter (`unusable.py`), the host-load
decisions of a step (`admission_step.py`, `admission.py`), what `pool_stats()` reports
(`stats.py`). This module connects them to vLLM:

- `SLoRAKVCacheManager` (installed on the scheduler's manager instance by class swap) runs every
  admission of a waiting/preempted request through `PagePool.admit` and every growth of a running
  request through `PagePool.grow`, and drops the request's adapter reference when vLLM frees it;
- the scheduler checks each new request's adapter at arrival, finishes requests whose adapter is
  unusable with `FINISHED_ERROR` (reason in `stop_reason` and in the log) without touching the
  others, attaches the workers' `StepCommands` to every `SchedulerOutput`, and keeps counters;
- admission by host readiness (`admission.py`): with a readiness oracle (the worker's host
  store when it shares this process, see `worker_link.py`, or `host_readiness=` for tests), a
  waiting request whose adapter is neither resident nor ready in pinned host memory is hidden
  from vLLM's waiting loop for the step (the requests behind it are still considered), and its
  host load starts at once; if nothing runs and nothing else is admissible, the first one is
  admitted anyway. Off unless `slora.admission_by_host_readiness` (or an explicit
  `host_readiness=`). Without an oracle (workers in other processes, or `prefetch_depth` 0) every
  request is admitted as it comes and the worker waits for host copies; queued adapters are then
  prefetched by hints in the StepCommands;
- admission by adapter bytes (`admission_budget.py`): with `slora.adapter_bytes_per_step_budget`,
  after the readiness gate, the waiting requests that would bring a new adapter into a batch
  whose adapter bytes are at the budget are hidden the same way, each for at most
  `slora.max_admission_wait_steps` steps. Off by default.

vLLM's own `max_loras` check (scheduler.py, waiting loop: a request whose lora id is new while
`max_loras` distinct ids are already scheduled this step is moved to `skipped_waiting`) stays in
force: with the plugin, `max_loras` is set to `SLoRAConfig.max_adapters_per_step`, so the only
per-step cap on distinct adapters is that ceiling; residency is limited by memory alone.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from slora_plugin.config import engine_settings
from slora_plugin.patches import kv_pool
from slora_plugin.patches import scheduler as vllm_patch
from slora_plugin.pool import admission_step, stats
from slora_plugin.pool.admission import HostReadiness
from slora_plugin.pool.admission_budget import AdapterBytesBudget, budget_bytes, pool_adapter_bytes
from slora_plugin.pool.commands import attach
from slora_plugin.pool.metrics import PoolMetrics, describe_export
from slora_plugin.pool.page_pool import AdapterNeed, PagePool, WaitForDrain
from slora_plugin.pool.unusable import AdapterUnusable, PagesOf, adapter_need, mark_failed_loads
from slora_plugin.pool.worker_link import WorkerLink, describe_link, engine_key, lookup

logger = init_logger("vllm.slora.pool")

#: Seconds between two pool-statistics log lines (when the engine logs stats).
STATS_LOG_INTERVAL_S = 10.0


class SLoRAKVCacheManager(KVCacheManager):
    """vLLM's KVCacheManager plus adapter residency in the same blocks. Never constructed:
    installed on an existing instance by `patches.scheduler.swap_kv_cache_manager`, then
    `slora_setup` adds the state."""

    pool: PagePool
    _pages_of: PagesOf
    _holders: dict[str, int]
    _unusable: dict[str, str]
    _usable_blocks: int

    def slora_setup(self, pages_of: PagesOf) -> None:
        self.pool = PagePool(vllm_patch.BlockPoolAllocator(self.block_pool))
        self._pages_of = pages_of
        self._holders = {}  # request id -> lora id it holds a reference to
        self._unusable = {}  # request id -> why its adapter cannot be used
        self._usable_blocks = self.block_pool.num_gpu_blocks - 1  # minus the null block

    # ------------------------------------------------------------ adapters
    def adapter_need(self, request: Request) -> AdapterNeed | None:
        """What admitting `request` takes besides KV; raises AdapterUnusable."""
        return adapter_need(request.lora_request, self._pages_of, self._usable_blocks)

    def content_key(self, lora_request: Any) -> str:
        """The prefix-cache key of an adapter: its content id (see patches/scheduler.py)."""
        return self._pages_of(lora_request)[1]

    def mark_unusable(self, request_id: str, reason: str) -> None:
        self._unusable[request_id] = reason

    def take_unusable(self) -> dict[str, str]:
        out, self._unusable = self._unusable, {}
        return out

    # --------------------------------------------------- vLLM's interface
    def allocate_slots(self, request: Request, num_new_tokens: int, *args: Any,
                       **kwargs: Any) -> KVCacheBlocks | None:
        base = super().allocate_slots
        rid = request.request_id
        if rid in self._holders or request.status == RequestStatus.RUNNING:
            return self.pool.grow(lambda: base(request, num_new_tokens, *args, **kwargs))
        if rid in self._unusable:
            return None
        try:
            need = self.adapter_need(request)
        except AdapterUnusable as e:
            self._unusable[rid] = str(e)
            return None

        def attempt(hold_back: int) -> KVCacheBlocks | None:
            with vllm_patch.holding_back(self.block_pool, hold_back):
                return base(request, num_new_tokens, *args, **kwargs)

        try:
            blocks = self.pool.admit(need, attempt)
        except WaitForDrain as e:
            logger.debug("request %s waits: %s", rid, e)
            return None
        if blocks is not None and need is not None:
            self._holders[rid] = need.lora_id
        return blocks

    def free(self, request: Request) -> None:
        super().free(request)
        self._release(request)

    def pop_blocks_for_free(self, request: Request) -> list:
        blocks = super().pop_blocks_for_free(request)
        self._release(request)
        return blocks

    def reset_prefix_cache(self) -> bool:
        """Idle adapters hold blocks, which would make vLLM's reset fail: evict them first,
        but only when nothing else is in use (otherwise the reset fails anyway)."""
        bp = self.block_pool
        if bp.num_gpu_blocks - bp.get_num_free_blocks() - self.pool.idle_pages == 1:
            self.pool.evict_idle()
        return super().reset_prefix_cache()

    def _release(self, request: Request) -> None:
        lora_id = self._holders.pop(request.request_id, None)
        if lora_id is not None:
            self.pool.release(lora_id)


class _SLoRAScheduling:
    """Mixed in before vLLM's Scheduler or AsyncScheduler (see `scheduler_class`)."""

    kv_cache_manager: SLoRAKVCacheManager

    def __init__(self, *args: Any, pages_of: PagesOf | None = None,
                 host_readiness: HostReadiness | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        vllm_patch.check_instance(self)
        self.slora_config = engine_settings(self.vllm_config)
        page_size = kv_pool.check_kv_cache_config(self.kv_cache_config)  # the worker checks the same
        self.page_elems = page_size // self.vllm_config.model_config.dtype.itemsize
        num_blocks = self.kv_cache_config.num_blocks
        #: Device bytes one block id stands for (its page in every layer's KV tensor).
        self.bytes_per_page = sum(t.size for t in self.kv_cache_config.kv_cache_tensors) // num_blocks
        if pages_of is None:
            from slora_plugin.pool.adapter_pages import default_pages_of

            pages_of = default_pages_of(self.vllm_config, self.slora_config, self.page_elems)
        mgr = vllm_patch.swap_kv_cache_manager(self, SLoRAKVCacheManager)
        mgr.slora_setup(pages_of)
        vllm_patch.apply()
        vllm_patch.set_content_key_resolver(mgr, "content_key")
        self.num_preemptions = 0
        self._host_readiness = host_readiness
        self._engine_key = engine_key(self.vllm_config)  # the config object's identity: fixed
        self._link_logged = False  # whether the worker link (or its absence) was logged
        #: request-steps a waiting request was hidden for want of its adapter's host copy, and
        #: requests admitted without it because nothing else could run (see admission.py)
        self.admission_holds = 0
        self.admission_forced = 0
        self._failed: list[tuple[Request, str]] = []
        self.admission_budget = self._adapter_bytes_budget(mgr)
        self._last_stats_log = time.monotonic()
        self.pool_metrics = PoolMetrics.for_config(self.vllm_config) if self.log_stats else None
        if self.pool_metrics is not None:
            logger.info(describe_export())

    # ------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        super().add_request(request)  # type: ignore[misc]
        if request.lora_request is None or self.requests.get(request.request_id) is not request:
            return
        try:
            self.kv_cache_manager.adapter_need(request)
        except AdapterUnusable as e:
            self.kv_cache_manager.mark_unusable(request.request_id, str(e))

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        readiness = self._readiness()
        self._mark_worker_failures()
        if readiness is None:
            self._mark_known_bad()
        self._fail_unusable()
        hidden = [self._hide_unready(readiness)] if readiness is not None else []
        try:
            if self.admission_budget is not None:
                hidden.append(self._hide_over_budget(self.admission_budget))
            output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            for h in reversed(hidden):
                if h is not None:
                    vllm_patch.unhide(self, h)
        # With an oracle the host loads of queued adapters were started above, at once.
        hints = admission_step.prefetch_hints(
            self.kv_cache_manager.pool, (self.skipped_waiting, self.waiting),
            self.slora_config.prefetch_depth) if readiness is None else ()
        attach(output, self.kv_cache_manager.pool.take_commands(hints))
        return output

    def _mark_worker_failures(self) -> None:
        """The requests of adapters whose load failed in the worker after admission (every
        request using it, running or not) become unusable. (Waiting requests whose host load
        is known to have failed are found by the admission scan, `_hide_unready`, or without
        the gate by `_mark_known_bad`.)"""
        link = self._worker_link()
        failed = link.failures.take() if link is not None else {}
        if not failed:
            return
        mgr = self.kv_cache_manager
        mark_failed_loads(failed, mgr.pool, self.requests.values(), mgr.mark_unusable)

    def _readiness(self) -> HostReadiness | None:
        """The oracle admission waits on this step, if any (`admission_step.step_readiness`)."""
        return admission_step.step_readiness(self.slora_config, self._host_readiness,
                                             self._worker_link)

    def _mark_known_bad(self) -> None:
        """Without the admission gate: the waiting requests whose adapter's host load is known
        to have failed become unusable (`admission_step.known_failed`)."""
        oracle = admission_step.host_oracle(self._host_readiness, self._worker_link)
        if oracle is None:
            return
        limit = admission_step.scan_limit(self.max_num_running_reqs,
                                          self.slora_config.prefetch_depth)
        mgr = self.kv_cache_manager
        for request, reason in admission_step.known_failed(vllm_patch.waiting_in_order(self),
                                                           oracle, limit):
            mgr.mark_unusable(request.request_id, reason)

    def _hide_unready(self, readiness: HostReadiness) -> vllm_patch.Hidden | None:
        """One walk over the waiting queue (`admission_step.plan_step`): finish the requests
        whose adapter's host load is known to have failed (so that they are never admitted:
        their load would fail in the worker), and take those whose adapters are not ready (and
        those not checked) out of vLLM's queues for this step."""
        waiting = vllm_patch.waiting_in_order(self)
        if not waiting:
            return None
        plan = admission_step.plan_step(
            waiting, self.kv_cache_manager.pool, readiness, max_running=self.max_num_running_reqs,
            num_running=len(self.running), prefetch_depth=self.slora_config.prefetch_depth)
        if plan.failed:
            for request, reason in plan.failed:
                self.kv_cache_manager.mark_unusable(request.request_id, reason)
            self._fail_unusable()
        self.admission_holds += len(plan.held)
        if plan.forced is not None:
            self.admission_forced += 1
            logger.debug("request %s admitted before its adapter's host copy is ready: "
                         "nothing else can run", plan.forced.request_id)
        return vllm_patch.hide(self, plan.held, plan.later)

    def _adapter_bytes_budget(self, mgr: SLoRAKVCacheManager) -> AdapterBytesBudget | None:
        """The adapter-bytes admission policy, when `slora.adapter_bytes_per_step_budget` is set."""
        fraction = self.slora_config.adapter_bytes_per_step_budget
        if fraction is None:
            return None
        from slora_plugin.pool.adapter_pages import base_weight_bytes

        budget = budget_bytes(fraction, base_weight_bytes(self.vllm_config))
        logger.info("slora: admission by adapter bytes: %.2f GB of adapters per step (%.2f x base "
                    "weights), a request held at most %d steps", budget / 1e9, fraction,
                    self.slora_config.max_admission_wait_steps)
        return AdapterBytesBudget(budget, self.slora_config.max_admission_wait_steps,
                                  pool_adapter_bytes(mgr.pool, mgr.adapter_need,
                                                     self.bytes_per_page))

    def _hide_over_budget(self, budget: AdapterBytesBudget) -> vllm_patch.Hidden | None:
        """Take the waiting requests the adapter-bytes budget holds out of vLLM's queues for
        this step (`admission_budget.plan_budget`)."""
        waiting = vllm_patch.waiting_in_order(self)
        if not waiting:
            return None
        plan = budget.plan(waiting, self.running,
                           slots=self.max_num_running_reqs - len(self.running), alive=self.requests)
        return vllm_patch.hide(self, plan.held, ())

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> dict:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        for request, reason in self._failed:
            eco = outputs.get(request.client_index)
            if eco is None:
                eco = outputs[request.client_index] = EngineCoreOutputs()
            eco.outputs.append(vllm_patch.finished_output(request, reason))
        self._failed.clear()
        if self.pool_metrics is not None:
            self.pool_metrics.update(self.pool_stats())
        if self.log_stats and time.monotonic() - self._last_stats_log >= STATS_LOG_INTERVAL_S:
            self._last_stats_log = time.monotonic()
            logger.info("slora page pool: %s", self.pool_stats())
        return outputs

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        self.num_preemptions += 1
        super()._preempt_request(request, timestamp)  # type: ignore[misc]

    def _fail_unusable(self) -> None:
        """Finish, with FINISHED_ERROR, the requests whose adapter turned out unusable; the
        client gets finish_reason "error" and the reason as stop_reason."""
        unusable = self.kv_cache_manager.take_unusable()
        if not unusable:
            return
        for request in self.finish_requests(unusable, RequestStatus.FINISHED_ERROR):  # type: ignore[attr-defined]
            reason = unusable[request.request_id]
            logger.error("request %s failed: %s", request.request_id, reason)
            request.stop_reason = reason
            self._failed.append((request, reason))

    def _worker_link(self) -> WorkerLink | None:
        """The worker of this engine, when it runs in this process (see worker_link)."""
        link = lookup(self._engine_key)
        if not self._link_logged:
            self._link_logged = True
            logger.info("slora: %s (engine %s, pid %d)",
                        describe_link(self.slora_config.admission_by_host_readiness,
                                      link is not None), self._engine_key, os.getpid())
        return link

    # ----------------------------------------------------------- operators
    def pool_stats(self) -> dict[str, int | float]:
        """`stats.pool_stats` of this scheduler; the `host_load_*` keys only with the worker in
        this process (the worker's process keeps them otherwise)."""
        mgr = self.kv_cache_manager
        block_pool = mgr.block_pool
        total = block_pool.num_gpu_blocks - 1  # minus the null block
        free = block_pool.get_num_free_blocks()
        link = self._worker_link()
        return stats.pool_stats(
            mgr.pool, pages_total=total, pages_free=free, bytes_per_page=self.bytes_per_page,
            preemptions=self.num_preemptions, admission_holds=self.admission_holds,
            admission_forced=self.admission_forced,
            host_waits=link.waits if link is not None else None)

    def adapter_residency(self) -> list[dict]:
        """One entry per resident adapter (name, path, pages, bytes, requests using it)."""
        return stats.adapter_residency(self.kv_cache_manager.pool, self.bytes_per_page)


class SLoRAScheduler(_SLoRAScheduling, Scheduler):
    """vLLM's synchronous Scheduler with the unified page pool."""


class SLoRAAsyncScheduler(_SLoRAScheduling, AsyncScheduler):
    """vLLM's AsyncScheduler (the 0.26 default) with the unified page pool."""


def scheduler_class(async_scheduling: bool) -> type:
    """The class to put in `SchedulerConfig.scheduler_cls` (after `async_scheduling` is final)."""
    return SLoRAAsyncScheduler if async_scheduling else SLoRAScheduler
