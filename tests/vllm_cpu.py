"""The real vLLM 0.26 scheduler on a CPU, with no model and no GPU: shared by every test that
needs vLLM's own Scheduler / AsyncScheduler, BlockPool and Request objects.

vLLM's own tests build schedulers the same way (tests/v1/core/utils.py `create_scheduler`, not
shipped in the wheel); this is a reconstruction from the 0.26 sources of `Scheduler.__init__`,
`EngineCore.__init__` (how it builds the scheduler and the request block hasher) and `Request`.
What vLLM would get from profiling the GPU (`KVCacheConfig`) is written by hand: one
full-attention group over the tiny model's layers, `num_blocks` blocks.

A "step" here is what `EngineCore.step` does minus the model: `schedule()`, a fake
`ModelRunnerOutput` sampling one token per request whose prefill is complete, and
`update_from_output()`. `EngineLoop` also reproduces the async engine's batch queue (schedule
step N+1 before the output of step N is processed), which is the order the AsyncScheduler sees
in production.

Import it from a test as `from vllm_cpu import ...` (pytest puts tests/ on sys.path through the
root conftest) after `write_model_config` has written a model directory.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from vllm.config import (CacheConfig, DeviceConfig, LoRAConfig, ModelConfig, SchedulerConfig,
                         VllmConfig)
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                        KVCacheTensor)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

#: The token every fake step samples: not the tiny model's EOS (2), so requests run to max_tokens.
SAMPLED_TOKEN = 7


def build_vllm_config(model_dir: str, *, block_size: int = 16, max_num_seqs: int = 64,
                      max_num_batched_tokens: int = 512, max_model_len: int = 512,
                      enable_prefix_caching: bool = True, async_scheduling: bool = False,
                      max_loras: int | None = 8, max_lora_rank: int = 16,
                      dtype: str = "float16",
                      additional_config: dict[str, Any] | None = None) -> VllmConfig:
    """A CPU VllmConfig for the tiny model in `model_dir`; LoRA on unless `max_loras` is None."""
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True,
                               max_model_len=max_model_len, dtype=dtype)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len, is_encoder_decoder=False, enable_chunked_prefill=True,
        async_scheduling=async_scheduling)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    lora_config = (LoRAConfig(max_loras=max_loras, max_cpu_loras=max_loras,
                              max_lora_rank=max_lora_rank)
                   if max_loras is not None else None)
    return VllmConfig(device_config=DeviceConfig("cpu"), model_config=model_config,
                      scheduler_config=scheduler_config, cache_config=cache_config,
                      lora_config=lora_config, additional_config=additional_config or {})


def layer_names(vllm_config: VllmConfig) -> list[str]:
    n = vllm_config.model_config.hf_config.num_hidden_layers
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def build_kv_cache_config(vllm_config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """What `get_kv_cache_configs` would produce for a dense model: one full-attention group,
    one KV tensor per layer of `num_blocks * page_size_bytes` bytes."""
    hf = vllm_config.model_config.hf_config
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    spec = FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                             num_kv_heads=hf.num_key_value_heads, head_size=head_size,
                             dtype=vllm_config.model_config.dtype)
    names = layer_names(vllm_config)
    tensors = [KVCacheTensor(size=spec.page_size_bytes * num_blocks, shared_by=[name])
               for name in names]
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors,
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def create_scheduler(model_dir: str | None = None, *, num_blocks: int = 128,
                     scheduler_cls: type | None = None, log_stats: bool = True,
                     scheduler_kwargs: dict[str, Any] | None = None,
                     vllm_config: VllmConfig | None = None, **config_kwargs: Any) -> Scheduler:
    """The real scheduler (`scheduler_cls`, default vLLM's own Scheduler or AsyncScheduler to
    match `async_scheduling`) over a `num_blocks`-block KV cache, built the way
    `EngineCore.__init__` builds it. Pass a `vllm_config` from `build_vllm_config` to build many
    schedulers cheaply (the config is not modified apart from `num_gpu_blocks`)."""
    if vllm_config is None:
        assert model_dir is not None, "give model_dir or vllm_config"
        vllm_config = build_vllm_config(model_dir, **config_kwargs)
    elif config_kwargs:
        raise TypeError(f"config options {sorted(config_kwargs)} given with a ready vllm_config")
    kv_cache_config = build_kv_cache_config(vllm_config, num_blocks)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    if scheduler_cls is None:
        scheduler_cls = (AsyncScheduler if vllm_config.scheduler_config.async_scheduling
                         else Scheduler)
    from slora_plugin.pool.scheduler import SLoRAAsyncScheduler, SLoRAScheduler

    if issubclass(scheduler_cls, (SLoRAScheduler, SLoRAAsyncScheduler)):
        # the plugin's schedulers read the settings engine_args writes; these tests skip it
        vllm_config.additional_config.setdefault("slora", {})
    block_size = vllm_config.cache_config.block_size
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=block_size,
        include_finished_set=False,
        log_stats=log_stats,
        **(scheduler_kwargs or {}),
    )


_hashers: dict[int, Any] = {}


def block_hasher(block_size: int):
    """The request block hasher EngineCore uses with prefix caching (sha256, as by default)."""
    if block_size not in _hashers:
        hash_fn = get_hash_fn_by_name("sha256")
        init_none_hash(hash_fn)
        _hashers[block_size] = get_request_block_hasher(block_size, hash_fn)
    return _hashers[block_size]


_request_ids = itertools.count()


def make_request(prompt_len: int = 32, max_tokens: int = 8, *,
                 lora_request: LoRARequest | None = None, request_id: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, block_size: int = 16,
                 priority: int = 0) -> Request:
    """A generation request with a hashed prompt (prefix caching works on it)."""
    if prompt_token_ids is None:
        prompt_token_ids = [100 + (i % 50) for i in range(prompt_len)]
    rid = request_id if request_id is not None else f"req-{next(_request_ids)}"
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id=rid, prompt_token_ids=list(prompt_token_ids),
                   sampling_params=params, pooling_params=None, lora_request=lora_request,
                   priority=priority, block_hasher=block_hasher(block_size))


def lora(lora_id: int, name: str | None = None, path: str | None = None) -> LoRARequest:
    name = name or f"adapter-{lora_id}"
    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path or f"/adapters/{name}")


def sampling_plan(scheduler: Scheduler, output: SchedulerOutput) -> dict[str, bool]:
    """Which scheduled requests sample a token in this step (prefill complete). Must be taken
    right after `schedule()`: the next schedule() call changes `is_prefill_chunk`."""
    return {rid: not scheduler.requests[rid].is_prefill_chunk
            for rid in output.num_scheduled_tokens}


def fake_model_output(output: SchedulerOutput, plan: dict[str, bool],
                      token: int = SAMPLED_TOKEN) -> ModelRunnerOutput:
    """What the model runner returns for `output`: one token per sampling request."""
    req_ids = list(output.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=[[token] if plan.get(rid) else [] for rid in req_ids],
    )


@dataclass
class EngineLoop:
    """EngineCore's step loop without a model. `depth` 1 is `EngineCore.step` (sync
    scheduling); depth 2 is `step_with_batch_queue` with async scheduling, where step N+1 is
    scheduled before the output of step N is processed."""

    scheduler: Scheduler
    depth: int = 1
    in_flight: deque = field(default_factory=deque)
    outputs: list[EngineCoreOutputs] = field(default_factory=list)
    scheduled: list[SchedulerOutput] = field(default_factory=list)

    def step(self) -> SchedulerOutput | None:
        """Schedule one step (if there is anything to schedule) and process the oldest output
        once `depth` steps are in flight or nothing more could be scheduled."""
        out = None
        if self.scheduler.has_requests():
            out = self.scheduler.schedule()
            self.scheduled.append(out)
            self.in_flight.append((out, sampling_plan(self.scheduler, out)))
            if len(self.in_flight) < self.depth and out.total_num_scheduled_tokens > 0:
                return out
        if self.in_flight:
            done, plan = self.in_flight.popleft()
            result = self.scheduler.update_from_output(done, fake_model_output(done, plan))
            self.outputs.extend(result.values())
        return out

    def finished_reasons(self) -> dict[str, Any]:
        """request id -> (finish reason, stop reason) of every request reported finished."""
        return {o.request_id: (o.finish_reason, o.stop_reason)
                for eco in self.outputs for o in eco.outputs if o.finish_reason is not None}

    def run(self, max_steps: int = 10_000) -> int:
        """Step until every request is done; returns the number of steps taken."""
        for n in range(max_steps):
            if not self.scheduler.has_requests() and not self.in_flight:
                return n
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")


def add_requests(scheduler: Scheduler, requests: Iterable[Request]) -> list[Request]:
    reqs = list(requests)
    for r in reqs:
        scheduler.add_request(r)
    return reqs


def engine_loop(scheduler: Scheduler) -> EngineLoop:
    """The loop matching the scheduler's own mode (batch queue of 2 under async scheduling)."""
    return EngineLoop(scheduler, depth=2 if isinstance(scheduler, AsyncScheduler) else 1)


__all__ = [
    "SAMPLED_TOKEN", "EngineLoop", "add_requests", "block_hasher", "build_kv_cache_config",
    "build_vllm_config", "create_scheduler", "engine_loop", "fake_model_output", "layer_names",
    "lora", "make_request", "sampling_plan",
]
