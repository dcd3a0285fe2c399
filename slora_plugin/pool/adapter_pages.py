"""The engine's adapter store, and the scheduler's `pages_of`: how many KV pages an adapter
takes, and its content id.

Scheduler and workers open their `AdapterStore` with `engine_store`, one function: the model's
dimensions (`engine_dims`: `ModelDims.from_hf_config`, through the text config of a composite
model), page size,
serving dtype, rank limit, adapter directory and LoRA target modules are read the same way in
both, so `AdapterStore.spec` gives both the same spec, and they agree on the layout by
construction (`slora_plugin.layout.plan_layout`). Both ask the store for an adapter by its
`LoRARequest.lora_path` (vLLM refuses an empty one; the plugin's resolver puts the adapter's
real directory there). The scheduler process never packs weights: its store gets no host cache
(0 bytes, no arena); the worker's gets `slora.host_cache_bytes`.
"""

from __future__ import annotations

from typing import Any

from slora_plugin.adapters.store import AdapterStore
from slora_plugin.config import SLoRAConfig
from slora_plugin.layout import ModelDims
from slora_plugin.pool.unusable import PagesOf
from slora_plugin.roofline import ModelBytes


def engine_dims(vllm_config: Any) -> ModelDims:
    """The dimensions of the engine's model, as its adapter stores use them."""
    return ModelDims.from_hf_config(vllm_config.model_config.hf_config,
                                    tp_size=vllm_config.parallel_config.tensor_parallel_size)


def base_weight_bytes(vllm_config: Any) -> int:
    """Bytes of the base weights one step reads (`roofline.ModelBytes.weight_bytes_per_step`,
    TP-local dims): what `slora.adapter_bytes_per_step_budget` is a fraction of."""
    mc = vllm_config.model_config
    return ModelBytes(engine_dims(vllm_config), mc.get_vocab_size(),
                      mc.dtype.itemsize).weight_bytes_per_step


def engine_store(vllm_config: Any, cfg: SLoRAConfig, page_elems: int, *,
                 host_cache_bytes: int = 0, loader_threads: int = 1,
                 wait_timeout_s: float = 60.0) -> AdapterStore:
    """The AdapterStore for the model, serving dtype and LoRA targets of `vllm_config` and
    pages of `page_elems` elements; without a host cache (the default) it only gives specs."""
    return AdapterStore(engine_dims(vllm_config), page_elems, vllm_config.model_config.dtype,
                        adapter_dir=cfg.adapter_dir,
                        max_rank=cfg.max_lora_rank, host_cache_bytes=host_cache_bytes,
                        loader_threads=loader_threads, wait_timeout_s=wait_timeout_s,
                        lora_target_modules=vllm_config.lora_config.target_modules)


def default_pages_of(vllm_config: Any, cfg: SLoRAConfig, page_elems: int) -> PagesOf:
    store = engine_store(vllm_config, cfg, page_elems)

    def pages_of(lora_request: Any) -> tuple[int, str]:
        spec = store.spec(lora_request.lora_path)
        return spec.num_pages, spec.content_id

    return pages_of
