"""Component: `vllm.lora.utils._all_lora_classes` (the LoRA layer classes `from_layer` tries).

The plugin's model manager wraps vLLM's linear layers with its paged subclasses (passed in by
the caller: `slora_plugin.worker.lora_layers.PAGED_CLASSES`) by swapping this module global for
the duration of its own `__init__` (where `_create_lora_modules` calls `from_layer`), then
restoring it, so nothing else in the process sees the swap. The layer methods the subclasses override are checked too.
Written against vLLM 0.26.0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from slora_plugin.patches.guard import Requires

VLLM_VERSION = "0.26.0"
REQUIRES = (
    Requires("vllm.lora.utils:_all_lora_classes"),
    Requires("vllm.lora.utils:from_layer",
             ("layer", "max_loras", "lora_config", "packed_modules_list", "model_config")),
    Requires("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA._apply_lora_to_output",
             ("self", "x", "output")),
    Requires("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA.create_lora_weights",
             ("self", "max_loras", "lora_config", "model_config")),
    Requires("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA.set_lora",
             ("self", "index", "lora_a", "lora_b")),
    Requires("vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA.reset_lora", ("self", "index")),
    Requires("vllm.lora.layers:ColumnParallelLinearWithLoRA"),
    Requires("vllm.lora.layers:MergedColumnParallelLinearWithLoRA"),
    Requires("vllm.lora.layers:QKVParallelLinearWithLoRA"),
    Requires("vllm.lora.layers:MergedQKVParallelLinearWithLoRA"),
    Requires("vllm.lora.layers:RowParallelLinearWithLoRA"),
    Requires("vllm.lora.layers:ReplicatedLinearWithLoRA"),
)


@contextmanager
def paged_lora_classes(replacements: Mapping[type, type]) -> Iterator[None]:
    """Within the block, `from_layer` builds `replacements[c]` wherever it would build vLLM's
    LoRA layer class `c` (the others are left as they are)."""
    import vllm.lora.utils as lora_utils

    original = lora_utils._all_lora_classes
    lora_utils._all_lora_classes = tuple(replacements.get(c, c) for c in original)
    try:
        yield
    finally:
        lora_utils._all_lora_classes = original
