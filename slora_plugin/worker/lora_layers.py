"""vLLM's linear LoRA layers, computing through the paged kernels instead of stacked slots.

Each subclass keeps everything vLLM's machinery reads (`output_slices`, `n_slices`, the
*shapes* of `lora_a_stacked`/`lora_b_stacked`, which `create_dummy_lora` and the sharding
helpers use) but allocates no stacked buffers: the stacks are `device="meta"` tensors, and
`set_lora`/`reset_lora` do nothing because the weights already sit in the adapter's KV pages.
The forward adds the LoRA delta with `torch.ops.slora.lora_linear`, keyed by the module name
(encoded as vLLM's `LayerName`, a graph input, so every decoder layer compiles to the same graph),
so the op finds the pool and tables at call time.
"""

from __future__ import annotations

import re

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

import slora_plugin.worker.ops  # noqa: F401  (registers torch.ops.slora.lora_linear)
from slora_plugin.layout import MODULE_INDEX, PACKED_MODULES
from slora_plugin.patches.layer_name import encode_layer_name

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PagedLoRAError(ValueError):
    """A LoRA-wrapped module cannot be served from pages."""


def layer_index(module_name: str) -> int:
    """The decoder-layer index in `model.layers.<i>.self_attn.qkv_proj`."""
    m = _LAYER_RE.search(module_name)
    if m is None:
        raise PagedLoRAError(f"{module_name}: not inside a decoder layer (no 'layers.<i>.')")
    return int(m.group(1))


def module_ids_of(module_name: str, n_slices: int) -> tuple[int, ...]:
    """The `layout.MODULES` indices of a vLLM module's output slices, in output order."""
    suffix = module_name.rsplit(".", 1)[-1]
    peft = PACKED_MODULES.get(suffix)
    if peft is None:
        raise PagedLoRAError(f"{module_name}: module {suffix!r} cannot be served from pages; "
                             f"supported: {sorted(PACKED_MODULES)}")
    if len(peft) != n_slices:
        raise PagedLoRAError(f"{module_name}: vLLM splits it into {n_slices} LoRA slices but the "
                             f"plugin expects {len(peft)} ({', '.join(peft)})")
    return tuple(MODULE_INDEX[m] for m in peft)


class PagedLoRALayer:
    """Mixin placed before a vLLM `*WithLoRA` class."""

    slora_key: str = ""
    slora_layer_name: object = None  # slora_key as the op's graph-input argument
    slora_module_ids: list[int]
    slora_slice_widths: list[int]

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        device = self.device
        self.device = torch.device("meta")
        try:
            super().create_lora_weights(max_loras, lora_config, model_config)  # type: ignore[misc]
        finally:
            self.device = device

    def bind_paged(self, module_name: str) -> None:
        """Give the layer its op key and module ids (the model manager calls this)."""
        ids = module_ids_of(module_name, self.n_slices)  # type: ignore[attr-defined]
        layer_index(module_name)
        self.slora_key = module_name
        self.slora_layer_name = encode_layer_name(module_name)
        self.slora_module_ids = list(ids)
        self.slora_slice_widths = [int(w) for w in self.output_slices]  # type: ignore[attr-defined]

    def set_lora(self, index, lora_a, lora_b) -> None:
        """No copy: the adapter's weights are already in its KV pages."""

    def reset_lora(self, index) -> None:
        """Nothing to clear: the slot's table row is cleared by the model manager."""

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self.slora_key:
            raise PagedLoRAError(f"{type(self).__name__} was never bound to a module name")
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        torch.ops.slora.lora_linear(output, x, self.slora_layer_name, self.slora_module_ids,
                                    self.slora_slice_widths)
        if original_shape is not None:
            output = output.reshape(original_shape)
        return output


class PagedColumnParallelLinearWithLoRA(PagedLoRALayer, ColumnParallelLinearWithLoRA):
    pass


class PagedMergedColumnParallelLinearWithLoRA(PagedLoRALayer, MergedColumnParallelLinearWithLoRA):
    pass


class PagedQKVParallelLinearWithLoRA(PagedLoRALayer, QKVParallelLinearWithLoRA):
    pass


class PagedMergedQKVParallelLinearWithLoRA(PagedLoRALayer, MergedQKVParallelLinearWithLoRA):
    pass


class PagedRowParallelLinearWithLoRA(PagedLoRALayer, RowParallelLinearWithLoRA):
    pass


class PagedReplicatedLinearWithLoRA(PagedLoRALayer, ReplicatedLinearWithLoRA):
    pass


#: vLLM class -> our subclass, for swapping `vllm.lora.utils._all_lora_classes`.
PAGED_CLASSES: dict[type, type] = {
    ColumnParallelLinearWithLoRA: PagedColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA: PagedMergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA: PagedQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA: PagedMergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA: PagedRowParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA: PagedReplicatedLinearWithLoRA,
}
