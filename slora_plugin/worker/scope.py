"""What the paged worker refuses: configurations the unified page pool cannot serve, and KV
caches or models whose shape it cannot use. Each refusal says which setting and why.

No vLLM import: the engine's `VllmConfig` is read by attribute (plain objects stand in for it).
"""

from __future__ import annotations

from typing import Any

import torch


class SLoRAScopeError(ValueError):
    """The engine configuration is outside what the plugin supports."""


def scope_problems(vllm_config: Any) -> list[str]:
    """Everything in `vllm_config` the unified page pool cannot serve (empty: all fine)."""
    p = []
    par = vllm_config.parallel_config
    if par.tensor_parallel_size > 1:
        p.append(f"tensor_parallel_size={par.tensor_parallel_size} (only 1 is supported)")
    if par.pipeline_parallel_size > 1:
        p.append(f"pipeline_parallel_size={par.pipeline_parallel_size} (only 1 is supported)")
    if getattr(par, "decode_context_parallel_size", 1) > 1:
        p.append("decode context parallelism")
    if vllm_config.kv_transfer_config is not None:
        p.append("a KV connector (kv_transfer_config): adapter pages are not KV to transfer")
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        p.append("sleep mode: it would discard the adapter pages with the KV cache")
    lc = vllm_config.lora_config
    if lc is None:
        p.append("LoRA is not enabled (the plugin's engine-args hook should have enabled it)")
    elif lc.fully_sharded_loras:
        p.append("fully_sharded_loras")
    return p


def check_scope(vllm_config: Any) -> None:
    found = scope_problems(vllm_config)
    if found:
        raise SLoRAScopeError("slora-plugin cannot serve this configuration: " + "; ".join(found)
                              + ". Disable the plugin or change these settings.")


def page_elems(page_size: int, dtype: torch.dtype) -> int:
    """Elements of `dtype` in one KV page of `page_size` bytes (adapter rows are laid out in
    the serving dtype); refuses a page that is not a whole number of them."""
    if page_size % dtype.itemsize:
        raise SLoRAScopeError(f"KV page of {page_size} bytes is not a whole number of "
                              f"{dtype} elements")
    return page_size // dtype.itemsize


def check_num_layers(model_layers: int, kv_layers: int) -> None:
    """One attention KV cache per decoder layer: each layer's adapter rows live in its pages."""
    if model_layers != kv_layers:
        raise SLoRAScopeError(f"the model has {model_layers} decoder layers but "
                              f"{kv_layers} attention KV caches")
