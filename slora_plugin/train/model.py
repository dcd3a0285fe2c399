"""The frozen base model: a transformers causal LM from a Hugging Face directory."""

from __future__ import annotations

import torch
from torch import nn


def load_base_model(path: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Loaded in `dtype` (fp16/bf16 on the GPU; fp32 on the CPU for exact comparisons), frozen."""
    from transformers import AutoModelForCausalLM  # heavy: only when a job actually runs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    """No base parameter trains (only the adapters' masters do), and no KV cache is built."""
    model.requires_grad_(False)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model
