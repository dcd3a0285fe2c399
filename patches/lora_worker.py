"""Component: vLLM's worker-side LoRA managers (`vllm.lora.worker_manager`,
`vllm.lora.model_manager`, `vllm.v1.worker.lora_model_runner_mixin`).

Both model runners (V1 `gpu_model_runner`, V2 `gpu/model_runner`) create their LoRA manager in
`LoRAModelRunnerMixin.load_lora_model` from the name `LRUCacheWorkerLoRAManager` imported into
the mixin's module. `SLoRAWorker.load_model` rebinds that name to the plugin's manager for the
duration of the call. The plugin's managers subclass vLLM's and override the private methods
listed here; the per-token slot index comes from the punica wrapper's base metadata alone
(`update_token_slots`: vLLM's own LoRA kernels' metadata is never prepared).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from slora_plugin.patches import guard
from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires

_MM = "vllm.lora.model_manager:LRUCacheLoRAModelManager"
_WM = "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager"
_OUR_MM = "slora_plugin.worker.lora_manager:SLoRAModelManager"
_OUR_WM = "slora_plugin.worker.lora_manager:SLoRAWorkerLoRAManager"
#: Set in vLLM's model manager __init__; read here and by `SLoRAModelManager`.
MODEL_MANAGER_ATTRIBUTES = InstanceAttributes(_MM, (
    "_registered_adapters", "lora_index_to_id", "lora_slots", "punica_wrapper_mapping",
    "vocab_size", "supports_mm", "max_num_batched_tokens", "modules"))
#: The methods the plugin's managers override: (vLLM class, ours, name, vLLM's signature, ours).
_OVERRIDES = (
    (_MM, _OUR_MM, "__init__", "(self, model, max_num_seqs, max_num_batched_tokens, vocab_size, "
                               "lora_config, device, vllm_config)",
     "(self, model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config, device, "
     "vllm_config)"),
    (_MM, _OUR_MM, "_match_target_modules", "(self, module_name)", "(self, module_name)"),
    (_MM, _OUR_MM, "register_module", "(self, module_name, module)", "(self, module_name, module)"),
    (_MM, _OUR_MM, "activate_adapter", "(self, lora_id)", "(self, lora_id)"),
    (_MM, _OUR_MM, "_deactivate_adapter", "(self, lora_id)", "(self, lora_id)"),
    (_MM, _OUR_MM, "remove_all_adapters", "(self)", "(self)"),
    (_MM, _OUR_MM, "_add_adapter", "(self, lora)", "(self, lora)"),
    (_MM, _OUR_MM, "_set_adapter_mapping", "(self, mapping)", "(self, mapping)"),
    (_WM, _OUR_WM, "_load_adapter", "(self, lora_request)", "(self, lora_request)"),
    (_WM, _OUR_WM, "add_dummy_lora", "(self, lora_request, rank)", "(self, lora_request, rank)"),
)
REQUIRES = (
    *(Overrides(f"{cls}.{name}", vllm, f"{ours_cls}.{name}", ours)
      for cls, ours_cls, name, vllm, ours in _OVERRIDES),
    Requires("vllm.v1.worker.lora_model_runner_mixin:LRUCacheWorkerLoRAManager"),
    Requires("vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin.load_lora_model",
             ("self", "model", "vllm_config", "device")),
    InstanceAttributes("vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin",
                       ("lora_manager",)),
    Requires(f"{_WM}._manager_cls"),
    Requires(f"{_WM}.list_adapters"),
    InstanceAttributes(_WM, ("_adapter_manager",)),
    Requires(f"{_MM}.add_adapter", ("self", "lora")),
    Requires(f"{_MM}.remove_adapter", ("self", "adapter_id")),
    MODEL_MANAGER_ATTRIBUTES,
    Requires("vllm.lora.model_manager:DEFAULT_LANGUAGE_WRAPPER_KEY"),
    Requires("vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.token_lora_indices"),
    Requires("vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase._update_base_metadata",
             ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size")),
    Requires("vllm.lora.lora_model:LoRAModel", ("lora_model_id", "rank", "loras")),
    Requires("vllm.lora.layers.utils:LoRAMapping", ("index_mapping",)),
    InstanceAttributes("vllm.v1.worker.gpu_model_runner:GPUModelRunner", ("model_memory_usage",)),
    InstanceAttributes("vllm.v1.worker.gpu.model_runner:GPUModelRunner", ("model_memory_usage",)),
    Requires("vllm.v1.worker.gpu_worker:Worker.determine_available_memory", ("self",)),
)


@contextmanager
def worker_lora_manager_class(cls: type) -> Iterator[None]:
    """Within the block, the model runners create `cls` as their worker LoRA manager."""
    import vllm.v1.worker.lora_model_runner_mixin as mixin

    original = mixin.LRUCacheWorkerLoRAManager
    mixin.LRUCacheWorkerLoRAManager = cls
    try:
        yield
    finally:
        mixin.LRUCacheWorkerLoRAManager = original


def update_token_slots(model_manager: Any, mapping: Any) -> torch.Tensor:
    """This step's slot index per token (-1: no adapter) for `mapping`, computed by the punica
    wrapper's `_update_base_metadata`: the first part of vLLM's `update_metadata`, without the
    rest. The rest (`LoRAKernelMeta.prepare_tensors`, twice) prepares vLLM's own LoRA kernels,
    which never run with the plugin, and synchronizes the host with the device twice per call (a
    device-to-host copy of its no-LoRA flag and a `torch.unique`): with async scheduling the
    CPU would wait for the previous step before finishing the inputs of this one."""
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

    wrapper = model_manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY]
    wrapper._update_base_metadata(mapping, model_manager.lora_index_to_id,
                                  model_manager.lora_slots + 1, model_manager.vocab_size)
    return wrapper.token_lora_indices


def distinct_adapters(mapping: Any) -> int:
    """The distinct adapters among `mapping`'s tokens (`LoRAMapping.index_mapping`: one LoRA id
    per token, 0 for none)."""
    return len(set(mapping.index_mapping) - {0})


def check_model_manager(model_manager: Any) -> None:
    """After vLLM's __init__: fail naming what the model manager lacks (see `guard`)."""
    guard.check_instances("LoRA model manager", ((model_manager, MODEL_MANAGER_ATTRIBUTES),))


def register_adapter(model_manager: Any, lora: Any) -> None:
    """Register `lora` as vLLM's `_add_adapter` does, without its weight copy (the plugin's
    weights are already in the adapter's KV pages)."""
    model_manager._registered_adapters[lora.id] = lora


def slot_of(model_manager: Any, lora_id: int) -> int | None:
    """The slot (`max_loras` row) adapter `lora_id` is active in, None if not active."""
    try:
        return model_manager.lora_index_to_id.index(lora_id)
    except ValueError:
        return None


def num_slots(model_manager: Any) -> int:
    """How many adapters can be active in one step (vLLM's `lora_slots`)."""
    return model_manager.lora_slots


def adapter_manager(worker_manager: Any) -> Any:
    """The model manager a worker LoRA manager created (from its `_manager_cls`)."""
    return worker_manager._adapter_manager


def add_model_memory(model_runner: Any, nbytes: int) -> None:
    """Count `nbytes` allocated after `load_model` (the compressed collections' resident bases)
    as model memory: `Worker.determine_available_memory` passes the runner's
    `model_memory_usage` to its profile as the weights' bytes, so the KV budget shrinks by
    them (tensors allocated before the profile run are otherwise not counted)."""
    model_runner.model_memory_usage += nbytes
