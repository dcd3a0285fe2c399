"""Component: vLLM's worker-side LoRA managers (`vllm.lora.worker_manager`,
`vllm.lora.model_manager`, `vllm.v1.worker.lora_model_runner_mixin`).

Both model runners (V1 `gpu_model_runner`, V2 `gpu/model_runner`) create their LoRA manager in
`LoRAModelRunnerMixin.load_lora_model` from the name `LRUCacheWorkerLoRAManager` imported into
the mixin's module. `SLoRAWorker.load_model` rebinds that name to the plugin's manager for the
duration of the call. The plugin's managers subclass vLLM's and override the private methods
listed here; the per-token slot index comes from the punica wrapper's base metadata alone
(`update_token_slots`: vLLM's own LoRA kernels' metadata is never prepared).
Written against vLLM 0.26.0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from slora_plugin.patches.guard import Requires

VLLM_VERSION = "0.26.0"
REQUIRES = (
    Requires("vllm.v1.worker.lora_model_runner_mixin:LRUCacheWorkerLoRAManager"),
    Requires("vllm.v1.worker.lora_model_runner_mixin:LoRAModelRunnerMixin.load_lora_model",
             ("self", "model", "vllm_config", "device")),
    Requires("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager._manager_cls"),
    Requires("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager._load_adapter",
             ("self", "lora_request")),
    Requires("vllm.lora.worker_manager:LRUCacheWorkerLoRAManager.add_dummy_lora",
             ("self", "lora_request", "rank")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager.__init__",
             ("self", "model", "max_num_seqs", "max_num_batched_tokens", "vocab_size",
              "lora_config", "device", "vllm_config")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager.activate_adapter",
             ("self", "lora_id")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager._deactivate_adapter",
             ("self", "lora_id")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager._add_adapter", ("self", "lora")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager._set_adapter_mapping",
             ("self", "mapping")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager._match_target_modules",
             ("self", "module_name")),
    Requires("vllm.lora.model_manager:LRUCacheLoRAModelManager.register_module",
             ("self", "module_name", "module")),
    Requires("vllm.lora.model_manager:DEFAULT_LANGUAGE_WRAPPER_KEY"),
    Requires("vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase.token_lora_indices"),
    Requires("vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase._update_base_metadata",
             ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size")),
    Requires("vllm.lora.lora_model:LoRAModel", ("lora_model_id", "rank", "loras")),
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
