"""Component: the LoRA cases of CUDA-graph capture and dispatch, in both model runners
(V2 `vllm.v1.worker.gpu.cudagraph_utils.CudaGraphManager`, V1
`vllm.v1.cudagraph_dispatcher.CudagraphDispatcher`).

vLLM captures one set of graphs per "number of active adapters" case because its punica
kernels' grids depend on it; with `cudagraph_specialize_lora=False` V2 still captures two sets
(0 and max_loras+1) and V1 runs batches without adapters eagerly. The paged kernels' grid does
not depend on the adapters and they exit early for tokens without one, so one set -- captured
with adapters, case max_loras+1 -- serves every batch.

The change is made on the plugin worker's own runner instance (never on the classes or the
module functions the runners import), so an engine without the plugin in the same process keeps
vLLM's behaviour:
  - `capture_one_lora_case(runner, lora_config)`, right after the runner is built: V2 captures
    only [max_loras+1]; V1's dispatcher lists only that case and dispatches every batch to it;
  - `dispatch_to_lora_case(runner, lora_config)`, after the KV cache (when V2 builds its graph
    manager): V2 dispatches every batch, with or without adapters, to that case.
"""

from __future__ import annotations

import functools
from typing import Any

from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires, UnsupportedVLLMError

REQUIRES = (
    Requires("vllm.v1.worker.gpu.model_runner:GPUModelRunner.initialize_kv_cache",
             ("self", "kv_cache_config")),
    Requires("vllm.v1.worker.gpu.model_runner:get_lora_capture_cases",
             ("lora_config", "compilation_config")),
    Requires("vllm.v1.worker.gpu.cudagraph_utils:CudaGraphManager.__init__",
             ("self", "vllm_config", "device", "cudagraph_mode", "decode_query_len",
              "lora_capture_cases")),
    Overrides("vllm.v1.worker.gpu.cudagraph_utils:ModelCudaGraphManager.dispatch",
              "(self, num_reqs, num_tokens, uniform_token_count, num_active_loras)",
              "slora_plugin.patches.lora_cudagraph:dispatch_to_lora_case.<locals>.dispatch",
              "(num_reqs, num_tokens, uniform_token_count, num_active_loras=0)"),
    InstanceAttributes("vllm.v1.worker.gpu.cudagraph_utils:ModelCudaGraphManager",
                       ("lora_capture_cases",)),
    InstanceAttributes("vllm.v1.worker.gpu.model_runner:GPUModelRunner",
                       ("lora_capture_cases", "cudagraph_manager")),
    Overrides("vllm.v1.cudagraph_dispatcher:CudagraphDispatcher._get_lora_cases", "(self)",
              "slora_plugin.patches.lora_cudagraph:capture_one_lora_case.<locals>.<lambda>", "()"),
    Overrides("vllm.v1.cudagraph_dispatcher:CudagraphDispatcher.dispatch",
              "(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, "
              "valid_modes=None, invalid_modes=None)",
              "slora_plugin.patches.lora_cudagraph:capture_one_lora_case.<locals>.dispatch",
              "(num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, "
              "valid_modes=None, invalid_modes=None)"),
    InstanceAttributes("vllm.v1.worker.gpu_model_runner:GPUModelRunner", ("cudagraph_dispatcher",)),
)


def lora_graph_case(lora_config: Any) -> int:
    """The one `num_active_loras` case the plugin captures: vLLM's "LoRA on, not specialized"."""
    return int(lora_config.max_loras) + 1


def _is_v2(runner: Any) -> bool:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return isinstance(runner, GPUModelRunner)


def capture_one_lora_case(runner: Any, lora_config: Any) -> None:
    """Before the KV cache exists: capture only the LoRA case (V2), or list and dispatch only
    it (V1). Raises UnsupportedVLLMError if the runner lacks what this relies on."""
    case = lora_graph_case(lora_config)
    if _is_v2(runner):
        if not hasattr(runner, "lora_capture_cases"):
            raise UnsupportedVLLMError("the V2 model runner has no lora_capture_cases")
        runner.lora_capture_cases = [case]
        return
    dispatcher = getattr(runner, "cudagraph_dispatcher", None)
    if dispatcher is None:
        raise UnsupportedVLLMError(f"{type(runner).__name__} has no cudagraph_dispatcher")
    dispatcher._get_lora_cases = lambda: [case]
    original = dispatcher.dispatch

    @functools.wraps(original)
    def dispatch(num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0,
                 valid_modes=None, invalid_modes=None):
        return original(num_tokens, uniform_decode=uniform_decode, has_lora=True,
                        num_active_loras=case, valid_modes=valid_modes,
                        invalid_modes=invalid_modes)

    dispatcher.dispatch = dispatch


def dispatch_to_lora_case(runner: Any, lora_config: Any) -> None:
    """After the KV cache (V2 builds its graph manager there): every batch, with or without
    adapters, replays the LoRA case's graphs. Nothing to do for V1 (done at capture)."""
    if not _is_v2(runner):
        return
    case = lora_graph_case(lora_config)
    manager = getattr(runner, "cudagraph_manager", None)
    if manager is None:
        raise UnsupportedVLLMError("the V2 model runner built no cudagraph_manager")
    if list(manager.lora_capture_cases) != [case]:
        raise UnsupportedVLLMError(
            f"the V2 graph manager captures LoRA cases {manager.lora_capture_cases}, expected "
            f"[{case}] (capture_one_lora_case must run before the KV cache is initialized)")
    original = manager.dispatch

    @functools.wraps(original)
    def dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=0):
        return original(num_reqs, num_tokens, uniform_token_count, num_active_loras=case)

    manager.dispatch = dispatch
