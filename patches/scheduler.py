"""Component: vLLM's v1 scheduler memory side -- `Scheduler`/`AsyncScheduler`, the
`KVCacheManager` they build, its `BlockPool`, and the prefix-cache block hash.

What the plugin changes (the subclasses themselves are in `slora_plugin.pool.scheduler`):

- the scheduler's `KVCacheManager` instance gets a subclass by class swap right after
  `Scheduler.__init__` (vLLM constructs `KVCacheManager(...)` by name inside `__init__`, with no
  hook); the swap keeps every attribute and the connector's `bind_gpu_block_pool` binding;
- adapter pages come from, and go back to, that manager's `BlockPool` (`get_new_blocks`,
  `free_blocks`, and `touch` to take back freed blocks when an admission is rolled back);
- admission holds adapter pages back by shadowing `BlockPool.get_num_free_blocks` on the
  instance for the duration of one `allocate_slots` call: both of vLLM's admission checks (the
  full-sequence gate and the per-step check) and `get_new_blocks` read that method, so vLLM
  admits a request only if its KV *and* its adapter's pages fit, without us allocating pages
  that vLLM's prefix-cache hit accounting could collide with;
- `kv_cache_utils._gen_lora_extra_hash_keys` (looked up as a module global at call time by the
  request block hasher and by BlockPool) keys KV blocks by the adapter's *content* instead of
  its name, so an adapter re-registered under the same name with new weights never reuses KV
  computed with the old weights (the vllm#42125 class of bug);
- admission by host readiness hides waiting requests from one `Scheduler.schedule` call: they
  are taken out of `waiting` / `skipped_waiting` before it and put back after it. That is the
  only way to skip a request without stopping the loop: the waiting loop *breaks* when
  `allocate_slots` returns None (everything behind waits too), and only its own checks
  (`max_loras`, blocked statuses, the connector) `continue` past a request, moving it to
  `skipped_waiting`. Held requests go where those skips go (front of `skipped_waiting`); the
  unchecked rest keeps its places.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import uuid
import weakref
from typing import Any, Callable, Iterator, Sequence

from slora_plugin.patches import guard
from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires, UnsupportedVLLMError

_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"
_ASYNC = "vllm.v1.core.sched.async_scheduler:AsyncScheduler"
_KVM = "vllm.v1.core.kv_cache_manager:KVCacheManager"
_POOL = "vllm.v1.core.block_pool:BlockPool"
_OURS = "slora_plugin.pool.scheduler:_SLoRAScheduling"
_OUR_KVM = "slora_plugin.pool.scheduler:SLoRAKVCacheManager"
#: Instance attributes (set in vLLM's __init__, so invisible on the class) the glue reads.
SCHEDULER_ATTRIBUTES = InstanceAttributes(_SCHED, (
    "kv_cache_manager", "kv_cache_config", "vllm_config", "requests", "waiting", "skipped_waiting",
    "running", "policy", "max_num_running_reqs", "log_stats"))
MANAGER_ATTRIBUTES = InstanceAttributes(_KVM, ("block_pool",))
BLOCK_POOL_ATTRIBUTES = InstanceAttributes(_POOL, ("blocks", "num_gpu_blocks", "null_block"))
#: The scheduler methods `_SLoRAScheduling` overrides: (name, vLLM's signature, ours). Both of
#: vLLM's schedulers are checked (the async one may override them in turn).
_SCHEDULER_OVERRIDES = (
    ("__init__", "(self, vllm_config, kv_cache_config, structured_output_manager, block_size, "
                 "hash_block_size=None, mm_registry=MULTIMODAL_REGISTRY, "
                 "include_finished_set=False, log_stats=False)",
     "(self, *args, pages_of=None, host_readiness=None, **kwargs)"),
    ("add_request", "(self, request)", "(self, request)"),
    ("schedule", "(self, throttle_prefills=False)", "(self, *args, **kwargs)"),
    ("update_from_output", "(self, scheduler_output, model_runner_output)",
     "(self, scheduler_output, model_runner_output)"),
    ("_preempt_request", "(self, request, timestamp)", "(self, request, timestamp)"),
)
_ASYNC_SIGNATURES = {"__init__": "(self, *args, **kwargs)"}
REQUIRES = (
    *(Overrides(f"{_SCHED}.{name}", vllm, f"{_OURS}.{name}", ours)
      for name, vllm, ours in _SCHEDULER_OVERRIDES),
    *(Overrides(f"{_ASYNC}.{name}", _ASYNC_SIGNATURES.get(name, vllm), f"{_OURS}.{name}", ours)
      for name, vllm, ours in _SCHEDULER_OVERRIDES),
    Requires(f"{_SCHED}.finish_requests", ("request_ids", "finished_status")),
    Requires(f"{_SCHED}.reset_prefix_cache"),
    SCHEDULER_ATTRIBUTES,
    Overrides(f"{_KVM}.allocate_slots",
              "(self, request, num_new_tokens, num_new_computed_tokens=0, "
              "new_computed_blocks=None, num_lookahead_tokens=0, num_external_computed_tokens=0, "
              "delay_cache_blocks=False, num_encoder_tokens=0, full_sequence_must_fit=False, "
              "reserved_blocks=0, has_scheduled_reqs=True)",
              f"{_OUR_KVM}.allocate_slots", "(self, request, num_new_tokens, *args, **kwargs)"),
    Overrides(f"{_KVM}.free", "(self, request)", f"{_OUR_KVM}.free", "(self, request)"),
    Overrides(f"{_KVM}.pop_blocks_for_free", "(self, request)", f"{_OUR_KVM}.pop_blocks_for_free",
              "(self, request)"),
    Overrides(f"{_KVM}.reset_prefix_cache", "(self)", f"{_OUR_KVM}.reset_prefix_cache", "(self)"),
    MANAGER_ATTRIBUTES,
    Requires(f"{_POOL}.get_new_blocks", ("num_blocks",)),
    Requires(f"{_POOL}.free_blocks", ("ordered_blocks",)),
    Requires(f"{_POOL}.touch", ("blocks",)),
    Overrides(f"{_POOL}.get_num_free_blocks", "(self)",
              "slora_plugin.patches.scheduler:holding_back.<locals>.<lambda>", "()"),
    BLOCK_POOL_ATTRIBUTES,
    Overrides("vllm.v1.core.kv_cache_utils:_gen_lora_extra_hash_keys", "(request)",
              "slora_plugin.patches.scheduler:lora_extra_hash_keys", "(request)"),
    Requires("vllm.v1.core.kv_cache_utils:generate_block_hash_extra_keys"),
    Requires("vllm.v1.kv_cache_interface:FullAttentionSpec"),
    Requires("vllm.v1.request:RequestStatus.FINISHED_ERROR"),
    Requires("vllm.v1.request:RequestStatus.RUNNING"),
    Requires("vllm.v1.request:Request.take_events"),
    Requires("vllm.v1.request:Request.get_finished_reason"),
    Requires("vllm.v1.request:Request.is_finished"),
    InstanceAttributes("vllm.v1.request:Request", ("request_id", "lora_request", "status",
                                                   "client_index", "stop_reason", "trace_headers")),
    Requires("vllm.v1.engine:EngineCoreOutput", ("request_id", "new_token_ids", "finish_reason",
                                                 "stop_reason", "events", "trace_headers")),
    Requires("vllm.v1.engine:EngineCoreOutputs", ("outputs",)),
    Requires("vllm.v1.core.sched.request_queue:SchedulingPolicy.FCFS"),
    Requires("vllm.v1.core.sched.request_queue:RequestQueue.add_request", ("request",)),
    Requires("vllm.v1.core.sched.request_queue:RequestQueue.prepend_request", ("request",)),
    Requires("vllm.v1.core.sched.request_queue:RequestQueue.remove_requests", ("requests",)),
)


def check_instance(scheduler: Any) -> None:
    """Fail at start-up, naming the attribute, if vLLM's __init__ no longer sets what we use."""
    mgr = getattr(scheduler, "kv_cache_manager", None)
    guard.check_instances("scheduler", (
        (scheduler, SCHEDULER_ATTRIBUTES), (mgr, MANAGER_ATTRIBUTES),
        (getattr(mgr, "block_pool", None), BLOCK_POOL_ATTRIBUTES)))


def finished_output(request: Any, reason: str) -> Any:
    """The `EngineCoreOutput` telling the client that `request` (just finished by the
    scheduler, outside a model step) ended with `reason` as its stop_reason."""
    from vllm.v1.engine import EngineCoreOutput

    return EngineCoreOutput(
        request_id=request.request_id, new_token_ids=[],
        finish_reason=request.get_finished_reason(), stop_reason=reason,
        events=request.take_events(), trace_headers=request.trace_headers)


def swap_kv_cache_manager(scheduler: Any, cls: type) -> Any:
    """Give the scheduler's KVCacheManager instance the subclass `cls`; returns the manager."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    mgr = scheduler.kv_cache_manager
    if type(mgr) is not KVCacheManager:
        raise UnsupportedVLLMError(
            f"slora-plugin: the scheduler's KV cache manager is {type(mgr).__qualname__}, "
            f"expected vLLM's KVCacheManager (another plugin replaced it?)")
    mgr.__class__ = cls
    return mgr


class BlockPoolAllocator:
    """`slora_plugin.pool.page_pool.BlockAllocator` over vLLM's BlockPool, by block id."""

    def __init__(self, block_pool: Any) -> None:
        self._pool = block_pool

    def allocate(self, n: int) -> list[int]:
        return [b.block_id for b in self._pool.get_new_blocks(n)]

    def free(self, block_ids: Sequence[int]) -> None:
        self._pool.free_blocks([self._pool.blocks[i] for i in block_ids])

    def reclaim(self, block_ids: Sequence[int]) -> None:
        blocks = [self._pool.blocks[i] for i in block_ids]
        taken = [b.block_id for b in blocks if b.ref_cnt != 0]
        if taken:
            raise RuntimeError(f"cannot take back blocks {taken}: they were reallocated")
        self._pool.touch(blocks)

    def num_free(self) -> int:
        return self._pool.get_num_free_blocks()


@contextlib.contextmanager
def holding_back(block_pool: Any, n: int) -> Iterator[None]:
    """While active, the pool reports `n` fewer free blocks to everyone (vLLM's checks and
    `get_new_blocks`), so an allocation inside leaves at least `n` blocks free."""
    if n <= 0:
        yield
        return
    real = type(block_pool).get_num_free_blocks.__get__(block_pool)
    block_pool.get_num_free_blocks = lambda: real() - n
    try:
        yield
    finally:
        del block_pool.get_num_free_blocks


# ------------------------------------------------------------- waiting requests

def waiting_in_order(scheduler: Any) -> list[Any]:
    """The waiting requests in the order `schedule`'s waiting loop considers them
    (`_select_waiting_queue_for_scheduling`): FCFS takes `skipped_waiting` first, then
    `waiting`; priority scheduling takes the smaller head of the two (Request orders itself)."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    if scheduler.policy == SchedulingPolicy.FCFS:
        return [*scheduler.skipped_waiting, *scheduler.waiting]
    return list(heapq.merge(scheduler.skipped_waiting, scheduler.waiting))


@dataclasses.dataclass
class Hidden:
    """Requests taken out of the waiting queues for one `schedule` call."""

    held: list[Any]  # back to the front of skipped_waiting, in this order
    later_skipped: list[Any]  # back to the end of skipped_waiting, in this order
    later_waiting: list[Any]  # back to the end of waiting, in this order


def hide(scheduler: Any, held: Sequence[Any], later: Sequence[Any]) -> Hidden:
    """Take `held` and `later` out of the waiting queues. `later` must be a tail of the
    consideration order (what follows it in either queue must be in it too), so that putting
    it back at the queues' ends restores their order."""
    hidden = Hidden(list(held), [], [])
    if not held and not later:
        return hidden
    in_skipped = {id(r) for r in scheduler.skipped_waiting}
    for r in later:
        (hidden.later_skipped if id(r) in in_skipped else hidden.later_waiting).append(r)
    gone = {*held, *later}
    if in_skipped:
        scheduler.skipped_waiting.remove_requests(gone)
    scheduler.waiting.remove_requests(gone)
    return hidden


def unhide(scheduler: Any, hidden: Hidden) -> None:
    """Put hidden requests back after `schedule` (see `Hidden`)."""
    for r in hidden.later_skipped:
        scheduler.skipped_waiting.add_request(r)
    for r in hidden.later_waiting:
        scheduler.waiting.add_request(r)
    for r in reversed(hidden.held):
        scheduler.skipped_waiting.prepend_request(r)


# ------------------------------------------------------------- prefix-cache hash keys

def _no_resolver() -> Callable[[Any], str] | None:
    return None


_resolver: Callable[[], Callable[[Any], str] | None] = _no_resolver
_original_lora_keys: Callable[[Any], list[str]] | None = None
#: Attribute on vLLM's Request caching its LoRA hash key (computed once per request, so every
#: block of the request, including blocks completed later by decoding, uses the same key).
KEY_ATTRIBUTE = "_slora_lora_hash_key"


def set_content_key_resolver(owner: Any, method_name: str) -> None:
    """Key LoRA blocks by `getattr(owner, method_name)(lora_request)`, while `owner` lives.
    Held weakly: once the owning scheduler is gone, vLLM's name keys apply again."""
    ref = weakref.ref(owner)

    def resolver() -> Callable[[Any], str] | None:
        obj = ref()
        return getattr(obj, method_name) if obj is not None else None

    global _resolver
    _resolver = resolver


def lora_extra_hash_keys(request: Any) -> list[str]:
    """Replacement of `_gen_lora_extra_hash_keys`: the adapter's content id, not its name."""
    lora_request = request.lora_request
    if not lora_request:
        return []
    key = request.__dict__.get(KEY_ATTRIBUTE)
    if key is None:
        content_key = _resolver()
        if content_key is None:
            assert _original_lora_keys is not None
            return _original_lora_keys(request)
        try:
            key = f"slora:{content_key(lora_request)}"
        except Exception:  # noqa: BLE001 - a broken adapter fails its request at admission
            # A key nothing else can ever match: such a request is finished with an error
            # before it computes any KV, and if the adapter is fixed meanwhile, its blocks
            # are simply never shared.
            key = f"slora-unresolved:{uuid.uuid4().hex}"
        setattr(request, KEY_ATTRIBUTE, key)
    return [key]


def apply() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    global _original_lora_keys
    if kv_cache_utils._gen_lora_extra_hash_keys is lora_extra_hash_keys:
        return
    _original_lora_keys = kv_cache_utils._gen_lora_extra_hash_keys
    kv_cache_utils._gen_lora_extra_hash_keys = lora_extra_hash_keys
