"""Component: `vllm.lora.resolver.LoRAResolverRegistry` (runtime adapter resolution).

Registers `slora_plugin.adapters.resolver.SLoRAResolver` under the name "slora", so that with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` the OpenAI server resolves any adapter name of
`slora.adapter_dir` on its first request. The registry and `LoRAResolver` are public-ish but
undocumented as API, so they are checked like every other vLLM name.
"""

from __future__ import annotations

from slora_plugin.config import SLoRAConfig, load_config
from slora_plugin.patches.guard import Overrides, Requires

REQUIRES = (
    Requires("vllm.lora.resolver:LoRAResolverRegistry.register_resolver", ("resolver_name", "resolver")),
    Requires("vllm.lora.resolver:LoRAResolverRegistry.resolvers"),
    Overrides("vllm.lora.resolver:LoRAResolver.resolve_lora", "(self, base_model_name, lora_name)",
              "slora_plugin.adapters.resolver:SLoRAResolver.resolve_lora",
              "(self, base_model_name, lora_name)"),
    Requires("vllm.lora.request:LoRARequest", ("lora_name", "lora_int_id", "lora_path")),
)


def apply(cfg: SLoRAConfig | None = None) -> None:
    """Register the resolver when the plugin is on with an adapter directory. `cfg` defaults to
    the environment's settings (register() runs before any additional_config is known)."""
    from slora_plugin.adapters.resolver import register_resolver

    register_resolver(cfg if cfg is not None else load_config(None))
