"""Component: `vllm.envs` (environment-variable registry).

Registers the plugin's variables in `vllm.envs.environment_variables`, so vLLM's start-up
validation neither warns about them nor (with `fail_on_environ_validation`) rejects them.
"""

from __future__ import annotations

import os

from slora_plugin.config import ENV_VARS
from slora_plugin.patches.guard import Requires

REQUIRES = (Requires("vllm.envs:environment_variables"),)


def apply() -> None:
    import vllm.envs

    if not hasattr(vllm.envs, "environment_variables"):
        return  # the guard reports this when the plugin is switched on

    for name in ENV_VARS:
        vllm.envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))
