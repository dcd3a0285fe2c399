"""Every patch the plugin makes to vLLM: what, why, since which vLLM, and what would remove it.

The guard checks the `REQUIRES` of exactly the modules listed here (`patch_modules()`), so a
patch cannot be forgotten by the start-up check or the port check; a test holds this list and
the files of `patches/` equal. When porting to a new vLLM, read `removed_by` first: an entry
whose upstream change has landed is a patch to delete, not to port.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Patch:
    module: str  # file name in patches/, without .py
    what: str  # the vLLM component and what is done to it
    why: str  # what the plugin would lose without it
    since: str  # the first vLLM release the patch was written for
    removed_by: str  # the upstream change that would make it unnecessary


#: In the order the guard reports problems.
PATCHES: tuple[Patch, ...] = (
    Patch("envs", "adds the plugin's variables to `vllm.envs.environment_variables`",
          "vLLM warns about (or, with fail_on_environ_validation, rejects) unknown VLLM_* "
          "variables such as VLLM_SLORA_CONFIG", "0.26.0",
          "a public way for plugins to declare environment variables"),
    Patch("engine_args", "wraps `EngineArgs.create_engine_config`; names the worker and scheduler "
          "classes (`worker_cls`, `scheduler_cls` as dotted strings)",
          "the plugin's switch lives in additional_config, which vLLM treats as opaque: LoRA, the "
          "worker, the scheduler, the LoRA target modules and the graph setting must be set from "
          "it in process 0, before and right after the config is built", "0.26.0",
          "a general-plugin hook called with EngineArgs before, and VllmConfig after, the config "
          "is built (what platform plugins get as check_and_update_config)"),
    Patch("lora_resolver", "registers the plugin's `LoRAResolver` in `LoRAResolverRegistry`",
          "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 `vllm serve` answers any adapter of "
          "slora.adapter_dir without --lora-modules", "0.26.0",
          "none needed: this is vLLM's resolver plugin API, checked because it is undocumented"),
    Patch("openai_errors", "wraps `AsyncLLM.add_lora` / `AsyncLLM.generate` and "
          "`OpenAIServingModels.resolve_lora`",
          "over HTTP vLLM drops the reason an adapter failed: a bare 400 at resolution, a 500 "
          "'Internal server error' for a request the plugin fails later; clients must see the "
          "adapter, the file and the reason", "0.26.0",
          "resolve_lora carrying the engine's add_lora error text, and the serving layer "
          "answering a finish_reason 'error' output with its stop_reason as a 400"),
    Patch("lora_layers", "swaps `vllm.lora.utils._all_lora_classes` during the model manager's "
          "__init__, and subclasses the six linear `*WithLoRA` layers",
          "the linear layers must compute through the paged kernels and allocate no stacked "
          "LoRA buffers", "0.26.0",
          "a registry of LoRA layer classes that plugins can extend (from_layer consulting it)"),
    Patch("lora_worker", "rebinds the worker LoRA manager class in `lora_model_runner_mixin` "
          "while the model loads; subclasses vLLM's model and worker LoRA managers; computes "
          "the per-token slots with the punica wrapper's `_update_base_metadata` only",
          "slots become rows of the page tables and adapters are registered only while "
          "resident; vLLM's own LoRA kernel metadata would cost two host-device syncs per step",
          "0.26.0",
          "a configurable worker LoRA manager class (like worker_cls) and a public slot-mapping "
          "hook that does not prepare the punica kernels' metadata"),
    Patch("kv_pool", "validates vLLM's KV cache layout (one full-attention group, blocks-first "
          "tensors) and subclasses `gpu_worker.Worker` (via worker_cls)",
          "adapter pages are KV blocks: the byte range of a block id must be the same in every "
          "layer", "0.26.0",
          "a documented KV-cache layout contract (or an API to borrow KV blocks for non-KV data)"),
    Patch("scheduler", "swaps the class of the scheduler's KVCacheManager, holds back free "
          "blocks during admission, hides waiting requests for one schedule call, replaces "
          "`kv_cache_utils._gen_lora_extra_hash_keys`, subclasses Scheduler/AsyncScheduler",
          "adapters and KV share one block pool: admission must count both, and prefix-cache "
          "keys must follow an adapter's content, not its name (vllm#42125)", "0.26.0",
          "a pluggable KVCacheManager class with an admission hook for extra blocks per request, "
          "and LoRA block-hash keys that follow the adapter's content"),
    Patch("lora_cudagraph", "on the plugin worker's own runner: V2 captures only the LoRA graph "
          "case and dispatches every batch to it; V1 lists and dispatches only that case",
          "the paged kernels' grid does not depend on the active adapters, so one graph set "
          "serves every batch instead of two (V2) or eager batches without adapters (V1)",
          "0.26.0",
          "cudagraph_specialize_lora=False meaning one LoRA graph set for every batch in both "
          "model runners"),
    Patch("layer_name", "uses `vllm.utils.torch_utils._encode_layer_name` / "
          "`_resolve_layer_name` for the op's layer key",
          "as a graph input (LayerName) every decoder layer compiles to the same graph; a string "
          "would compile each layer separately", "0.26.0",
          "the LayerName helpers becoming public API"),
)

#: The other files of patches/: the machinery that checks the patches, patching nothing.
TOOLING: dict[str, str] = {
    "guard": "the declarations (Requires, Overrides, InstanceAttributes) and the start-up check",
    "catalogue": "this list",
    "vllm_source": "vLLM names and signatures read from parsed source (port check, and "
                   "instance attributes at start)",
    "port_check": "the guard run against the source of any vLLM release, without installing it",
}


def patch_modules() -> list[ModuleType]:
    """The patch modules, imported (each declares its `REQUIRES`)."""
    return [importlib.import_module(f"slora_plugin.patches.{p.module}") for p in PATCHES]
