"""Paged LoRA kernels (Triton) and their plain-torch references. Imports torch and triton only."""

from slora_plugin.kernels.paged_lora import (
    DECODE_MAX_TOKENS,
    KernelConfig,
    Launch,
    SegmentMeta,
    choose_config,
    decode_config,
    launch_plans,
    paged_lora_expand,
    paged_lora_linear,
    paged_lora_shrink,
    prefill_config,
    shrink_buffer,
)
from slora_plugin.kernels.reference import bound_violations, lora_linear_exact, lora_linear_ref

__all__ = [
    "DECODE_MAX_TOKENS",
    "KernelConfig",
    "Launch",
    "bound_violations",
    "SegmentMeta",
    "choose_config",
    "decode_config",
    "launch_plans",
    "lora_linear_exact",
    "lora_linear_ref",
    "paged_lora_expand",
    "paged_lora_linear",
    "paged_lora_shrink",
    "prefill_config",
    "shrink_buffer",
]
