"""Component: `vllm.lora.utils._all_lora_classes` (the LoRA layer classes `from_layer` tries).

The plugin's model manager wraps vLLM's linear layers with its paged subclasses (passed in by
the caller: `slora_plugin.worker.lora_layers.PAGED_CLASSES`) by swapping this module global for
the duration of its own `__init__` (where `_create_lora_modules` calls `from_layer`), then
restoring it, so nothing else in the process sees the swap. The layer methods the subclasses
override are declared with their signatures.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires

#: vLLM's linear LoRA layers the plugin subclasses (in `slora_plugin.worker.lora_layers`).
LINEAR_CLASSES = ("ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
                  "QKVParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA",
                  "RowParallelLinearWithLoRA", "ReplicatedLinearWithLoRA")
#: The layer methods the plugin's mixin overrides, with the signature both sides have.
_LAYER_OVERRIDES = (
    ("create_lora_weights", "(self, max_loras, lora_config, model_config=None)"),
    ("set_lora", "(self, index, lora_a, lora_b)"),
    ("reset_lora", "(self, index)"),
    ("_apply_lora_to_output", "(self, x, output)"),
)
REQUIRES = (
    Requires("vllm.lora.utils:_all_lora_classes"),
    Requires("vllm.lora.utils:from_layer",
             ("layer", "max_loras", "lora_config", "packed_modules_list", "model_config")),
    *(Overrides(f"vllm.lora.layers:{cls}.{name}", signature,
                f"slora_plugin.worker.lora_layers:PagedLoRALayer.{name}", signature)
      for cls in LINEAR_CLASSES for name, signature in _LAYER_OVERRIDES),
    *(InstanceAttributes(f"vllm.lora.layers:{cls}", ("device", "n_slices", "output_slices"))
      for cls in LINEAR_CLASSES),
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
