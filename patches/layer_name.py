"""Component: `vllm.utils.torch_utils` layer-name encoding for custom ops (`LayerName`).

A string argument of a custom op is baked into the compiled graph as a constant, so the 32
decoder layers' graph pieces all differ and vLLM compiles each piece separately instead of
reusing the first (its Inductor artifacts are deduplicated by the AOT-autograd cache key). vLLM's
own attention/MoE/KV-cache ops avoid this with `LayerName`, an opaque value type (torch >= 2.11)
that torch.compile lifts as a graph input; `slora::lora_linear` takes its layer key the same way.
With `VLLM_USE_LAYERNAME=0` (or torch < 2.11) vLLM falls back to plain strings and so do we
(correct, but compiled per layer).
"""

from __future__ import annotations

from typing import Any

from slora_plugin.patches.guard import Requires

REQUIRES = (
    Requires("vllm.utils.torch_utils:LayerNameType"),
    Requires("vllm.utils.torch_utils:_encode_layer_name", ("layer_name",)),
    Requires("vllm.utils.torch_utils:_resolve_layer_name", ("layer_name",)),
)

try:
    from vllm.utils.torch_utils import LayerNameType
except ImportError:  # the guard names what is missing when the plugin is switched on
    LayerNameType = str  # type: ignore[misc]

__all__ = ["LayerNameType", "encode_layer_name", "resolve_layer_name"]


def encode_layer_name(name: str) -> Any:
    """`name` as the op argument vLLM's own layer-keyed ops use (a LayerName when enabled)."""
    from vllm.utils.torch_utils import _encode_layer_name

    return _encode_layer_name(name)


def resolve_layer_name(layer: Any) -> str:
    """The module name inside an encoded op argument (a plain str passes through)."""
    from vllm.utils.torch_utils import _resolve_layer_name

    return _resolve_layer_name(layer)
