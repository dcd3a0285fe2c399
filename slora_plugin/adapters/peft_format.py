"""The PEFT on-disk format: tensor names and a writer of valid adapters.

Tests, the `adapters synth` CLI and the benchmarks all need real adapters in the exact layout
the `peft` library writes (`adapter_config.json` + `adapter_model.safetensors`), without
downloading anything. One writer keeps them in agreement with the reader.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file

from slora_plugin.layout import MODULES, ModelDims

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

#: Where each module lives in a Llama-style decoder layer.
MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def tensor_name(layer: int, module: str, which: str) -> str:
    """PEFT's key for lora_A / lora_B of one module of one layer."""
    return (f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}."
            f"lora_{which}.weight")


def adapter_config(rank: int, alpha: float, target_modules: Sequence[str] | str,
                   base_model: str = "", **extra: object) -> dict:
    """A PEFT LoraConfig as `save_pretrained` writes it (the keys this plugin reads, and more)."""
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(target_modules) if not isinstance(target_modules, str) else target_modules,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    cfg.update(extra)
    return cfg


def random_weights(dims: ModelDims, ranks: Mapping[str, int], generator: torch.Generator,
                   dtype: torch.dtype = torch.float16, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random A and B for every layer and every module with a non-zero rank (B is not zero,
    unlike a fresh PEFT init, so the adapter changes the output)."""
    tensors = {}
    for layer in range(dims.num_hidden_layers):
        for m in MODULES:
            r = ranks.get(m, 0)
            if not r:
                continue
            fin, fout = dims.module_io(m)
            tensors[tensor_name(layer, m, "A")] = (torch.randn(r, fin, generator=generator) * std).to(dtype)
            tensors[tensor_name(layer, m, "B")] = (torch.randn(fout, r, generator=generator) * std).to(dtype)
    return tensors


def write_adapter(path: str, config: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> str:
    """Write one adapter directory; returns its path."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_NAME))
    return path


def write_random_adapter(path: str, dims: ModelDims, rank: int, target_modules: Sequence[str],
                         alpha: float | None = None, seed: int = 0,
                         dtype: torch.dtype = torch.float16, **config_extra: object) -> str:
    """A valid random adapter of one rank over `target_modules` (PEFT module names)."""
    g = torch.Generator().manual_seed(seed)
    ranks = {m: rank for m in target_modules}
    tensors = random_weights(dims, ranks, g, dtype)
    cfg = adapter_config(rank, alpha if alpha is not None else 2 * rank, target_modules, **config_extra)
    return write_adapter(path, cfg, tensors)
