"""The scheduler's `pages_of`: how many KV pages an adapter takes, and its content id.

Both come from the host adapter store's config-level spec (`AdapterStore.spec`: reads
`adapter_config.json` and stats the weights, cached until the files change), so the scheduler
and the workers agree on the layout by construction (`slora_plugin.layout.plan_layout`). The
scheduler process never packs weights: its store gets no host cache (0 bytes, no arena).
"""

from __future__ import annotations

from typing import Any, Callable

from slora_plugin.adapters.store import AdapterStore
from slora_plugin.config import SLoRAConfig
from slora_plugin.layout import ModelDims


def spec_store(vllm_config: Any, cfg: SLoRAConfig, page_elems: int) -> AdapterStore:
    """A spec-only AdapterStore for the model and page size of `vllm_config`."""
    model_config = vllm_config.model_config
    dims = ModelDims.from_hf_config(model_config.hf_config,
                                    tp_size=vllm_config.parallel_config.tensor_parallel_size)
    return AdapterStore(dims, page_elems, model_config.dtype, adapter_dir=cfg.adapter_dir,
                        max_rank=cfg.max_lora_rank, host_cache_bytes=0, loader_threads=1,
                        lora_target_modules=vllm_config.lora_config.target_modules)


def default_pages_of(vllm_config: Any, cfg: SLoRAConfig,
                     page_elems: int) -> Callable[[Any], tuple[int, str]]:
    store = spec_store(vllm_config, cfg, page_elems)

    def pages_of(lora_request: Any) -> tuple[int, str]:
        spec = store.spec(lora_request.lora_path or lora_request.lora_name)
        return spec.num_pages, spec.content_id

    return pages_of
