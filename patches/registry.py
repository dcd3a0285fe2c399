"""The list of patch modules, so the guard checks every one of them and nothing is forgotten."""

from __future__ import annotations

import importlib
from types import ModuleType

#: One entry per file in patches/ that touches vLLM (guard.py and this file excluded).
PATCH_MODULES: tuple[str, ...] = ("envs", "engine_args", "lora_resolver", "lora_layers",
                                  "lora_worker", "kv_pool", "scheduler", "lora_cudagraph",
                                  "layer_name", "openai_errors")


def patch_modules() -> list[ModuleType]:
    return [importlib.import_module(f"slora_plugin.patches.{name}") for name in PATCH_MODULES]
