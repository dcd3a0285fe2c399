"""Component: vLLM's KV cache as the adapter page pool (`KVCacheConfig`, the attention layers'
`kv_cache` in `compilation_config.static_forward_context`, and `gpu_worker.Worker`).

The unified pool relies on one fact of vLLM 0.26: with one full-attention KV group and a
blocks-first backend, KV block id b is the contiguous bytes [b * page, (b + 1) * page) of each
layer's KV storage. This file checks that fact on the real allocation, refusing anything else
with a clear message, and finds each decoder layer's attention module (whose `kv_cache` the
plugin's op resolves at call time; a missing `static_forward_context` entry or `kv_cache`
attribute is reported by `attention_layers`, the guard cannot see dataclass fields). It also
lists the `Worker` methods `SLoRAWorker` overrides.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires

_WORKER = "vllm.v1.worker.gpu_worker:Worker"
_OURS = "slora_plugin.worker.worker:SLoRAWorker"
#: The `Worker` methods `SLoRAWorker` overrides: (name, vLLM's signature, ours).
_WORKER_OVERRIDES = (
    ("__init__", "(self, vllm_config, local_rank, rank, distributed_init_method, "
                 "is_driver_worker=False)",
     "(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False)"),
    ("init_device", "(self)", "(self)"),
    ("load_model", "(self, *, load_dummy_weights=False)", "(self, *args, **kwargs)"),
    ("initialize_from_config", "(self, kv_cache_config)", "(self, kv_cache_config)"),
    ("execute_model", "(self, scheduler_output)", "(self, scheduler_output)"),
    ("add_lora", "(self, lora_request)", "(self, lora_request)"),
    ("shutdown", "(self)", "(self)"),
)
REQUIRES = (
    *(Overrides(f"{_WORKER}.{name}", vllm, f"{_OURS}.{name}", ours)
      for name, vllm, ours in _WORKER_OVERRIDES),
    InstanceAttributes(_WORKER, ("model_runner", "model_config", "device", "vllm_config")),
    Requires("vllm.v1.kv_cache_interface:KVCacheConfig",
             ("num_blocks", "kv_cache_tensors", "kv_cache_groups")),
    Requires("vllm.v1.kv_cache_interface:KVCacheTensor", ("size", "shared_by", "offset", "block_stride")),
    Requires("vllm.v1.kv_cache_interface:FullAttentionSpec.page_size_bytes"),
)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class KVLayoutError(ValueError):
    """The KV cache is not laid out as pages the plugin can share with adapters."""


def check_kv_cache_config(cfg: Any) -> int:
    """Validate the scheduler's KV plan; returns page_size_bytes of one block of one layer."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = cfg.kv_cache_groups
    if len(groups) != 1:
        raise KVLayoutError(f"slora-plugin needs exactly one KV cache group (one kind of "
                            f"attention); this model has {len(groups)} (hybrid attention: pass "
                            f"--disable-hybrid-kv-cache-manager)")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None) is not None \
            or getattr(spec, "attention_chunk_size", None) is not None:
        raise KVLayoutError(f"slora-plugin needs full attention KV pages; the model's KV spec is "
                            f"{type(spec).__name__}")
    if getattr(spec, "page_size_padded", None) is not None:
        raise KVLayoutError("slora-plugin does not support padded KV pages (page_size_padded)")
    page = int(spec.page_size_bytes)
    for t in cfg.kv_cache_tensors:
        if len(t.shared_by) != 1 or t.offset or t.block_stride:
            raise KVLayoutError(f"KV tensor {t.shared_by} is shared or packed (offset={t.offset}, "
                                f"block_stride={t.block_stride}); slora-plugin needs one plain "
                                f"tensor per layer")
        if t.size != cfg.num_blocks * page:
            raise KVLayoutError(f"KV tensor of {t.shared_by[0]} is {t.size} bytes, expected "
                                f"{cfg.num_blocks} blocks x {page} bytes")
    return page


def attention_layers(vllm_config: Any, cfg: Any) -> list[tuple[Any, str]]:
    """(attention module, layer name) of decoder layers 0..L-1, in order."""
    ctx = vllm_config.compilation_config.static_forward_context
    by_layer: dict[int, tuple[Any, str]] = {}
    for name in cfg.kv_cache_groups[0].layer_names:
        m = _LAYER_RE.search(name)
        if m is None:
            raise KVLayoutError(f"attention layer {name!r} is not inside a decoder layer")
        i = int(m.group(1))
        if i in by_layer:
            raise KVLayoutError(f"decoder layer {i} has two attention layers "
                                f"({by_layer[i][1]}, {name})")
        if name not in ctx or not hasattr(ctx[name], "kv_cache"):
            raise KVLayoutError(f"attention layer {name!r} has no kv_cache in the forward context")
        by_layer[i] = (ctx[name], name)
    if sorted(by_layer) != list(range(len(by_layer))):
        raise KVLayoutError(f"attention layers cover decoder layers {sorted(by_layer)}, "
                            f"expected 0..{len(by_layer) - 1}")
    return [by_layer[i] for i in range(len(by_layer))]


def check_blocks_first(kv: Any, num_blocks: int, page_size: int, name: str) -> None:
    """Block b of this layer must be the bytes [b * page_size, (b + 1) * page_size) of its storage."""
    if not isinstance(kv, torch.Tensor):
        raise KVLayoutError(f"{name}: kv_cache is {type(kv).__name__}, expected one tensor")
    nbytes = kv.untyped_storage().nbytes()
    if nbytes != num_blocks * page_size or kv.storage_offset() != 0:
        raise KVLayoutError(f"{name}: KV storage is {nbytes} bytes at offset "
                            f"{kv.storage_offset()}, expected {num_blocks} x {page_size} at 0")
    outer = max(range(kv.dim()), key=lambda d: kv.stride(d))
    size, stride = kv.shape[outer], kv.stride(outer) * kv.element_size()
    if size % num_blocks or size * stride != nbytes:
        raise KVLayoutError(f"{name}: KV shape {tuple(kv.shape)} strides {kv.stride()} is not "
                            f"blocks-first (the attention backend must index blocks by the "
                            f"outermost stride)")
