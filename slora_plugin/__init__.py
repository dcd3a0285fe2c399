"""slora-plugin: thousands of LoRA adapters served from vLLM's own KV pages.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it once in every process
(front end, engine core, each worker), so it must be cheap, idempotent, and change nothing
observable unless the plugin is switched on (see `slora_plugin.config`).
"""

from __future__ import annotations

import sys as _sys

from slora_plugin.source_tree import mount_sibling_folders as _mount_sibling_folders

__version__ = "0.1.0.dev0"

_registered = False

_mount_sibling_folders(_sys.modules[__name__])


def register() -> None:
    """Register the plugin's environment variables, its engine-config hook and, when the
    environment switches the plugin on, its adapter resolver."""
    global _registered
    if _registered:
        return
    _registered = True
    from slora_plugin.patches import engine_args, envs, lora_resolver

    envs.apply()
    engine_args.apply()
    lora_resolver.apply()
