"""Component: `vllm.engine.arg_utils.EngineArgs.create_engine_config`.

The plugin's single switch lives in `additional_config["slora"]` (or the environment), which
vLLM treats as opaque. This wrapper reads it in process 0, before the config is built, and when
the plugin is on: runs the version guard, turns on LoRA with the settings the paged design
needs, and writes the parsed settings back into `additional_config["slora"]` so that every other
process (engine core, workers) reads the same validated values. When the switch is off the
original method runs untouched. Once the config is built (the model's layer count is known), the
modules that get LoRA layers are chosen (`slora_plugin.adapters.targets.choose_target_modules`:
slora.target_modules, else the modules the adapters of slora.adapter_dir target) and written into
`LoRAConfig.target_modules`, which the workers' LoRA manager and both adapter stores read.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

from slora_plugin.config import (ADDITIONAL_CONFIG_KEY, SLoRAConfig, SLoRAConfigError, load_config,
                                 unwrapped_keys_warning)
from slora_plugin.patches.guard import Overrides, Requires

logger = init_logger("vllm.slora.engine_args")

REQUIRES = (
    Overrides("vllm.engine.arg_utils:EngineArgs.create_engine_config",
              "(self, usage_context=None, headless=False)",
              "slora_plugin.patches.engine_args:apply.<locals>.create_engine_config",
              "(self, *args, **kwargs)"),
    Requires("vllm.engine.arg_utils:EngineArgs.__dataclass_fields__"),
    Requires("vllm.config.lora:LoRAConfig", ("max_lora_rank", "max_loras", "max_cpu_loras",
                                             "target_modules", "fully_sharded_loras")),
    Requires("vllm.config.scheduler:SchedulerConfig", ("scheduler_cls", "async_scheduling")),
    Requires("vllm.config.scheduler:SchedulerConfig.get_scheduler_cls", ("self",)),
)
#: EngineArgs fields this patch sets.
FIELDS = ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules",
          "additional_config", "worker_cls", "compilation_config")
#: The worker that serves adapters from KV pages.
WORKER_CLS = "slora_plugin.worker.worker.SLoRAWorker"
#: `SchedulerConfig.scheduler_cls` by the final `async_scheduling`: named, not imported (vLLM
#: resolves a dotted name in the engine core), so that this module never imports `pool/`.
SCHEDULER_CLS = {True: "slora_plugin.pool.scheduler.SLoRAAsyncScheduler",
                 False: "slora_plugin.pool.scheduler.SLoRAScheduler"}
#: Ranks vLLM's LoRAConfig accepts (`vllm.config.lora.MaxLoRARanks`).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's LoRA flags the plugin overrides -> the plugin setting their value comes from.
OVERRIDDEN_FLAGS = {"max_loras": "max_adapters_per_step", "max_cpu_loras": "max_adapters_per_step",
                    "max_lora_rank": "max_lora_rank"}
#: Override lines already logged in this process (an engine may be built more than once).
_logged_overrides: set[str] = set()


def vllm_max_rank(rank: int) -> int:
    """The smallest rank vLLM's LoRAConfig accepts that is >= the plugin's maximum."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise SLoRAConfigError(f"slora.max_lora_rank: {rank} is above vLLM's largest rank {VLLM_RANKS[-1]}")


def configure_engine_args(args: Any, cfg: SLoRAConfig) -> None:
    """Set the EngineArgs fields the plugin needs (called with the plugin on, before the config)."""
    from slora_plugin.patches import catalogue, guard, lora_resolver, openai_errors

    guard.enforce(catalogue.patch_modules(), allow_untested_version=cfg.allow_untested_vllm)
    missing = [f for f in FIELDS if f not in type(args).__dataclass_fields__]
    if missing:
        raise guard.UnsupportedVLLMError(f"EngineArgs lacks field(s) {missing}")
    plugin_values = {"max_loras": cfg.max_adapters_per_step,
                     "max_cpu_loras": cfg.max_adapters_per_step,
                     "max_lora_rank": vllm_max_rank(cfg.max_lora_rank)}
    log_overridden_flags(lora_flag_overrides(args, cfg, plugin_values))
    args.enable_lora = True
    for name, value in plugin_values.items():
        setattr(args, name, value)
    if cfg.target_modules is not None:
        args.lora_target_modules = list(cfg.target_modules)
    args.additional_config = dict(args.additional_config or {})
    args.additional_config[ADDITIONAL_CONFIG_KEY] = cfg.to_dict()
    args.worker_cls = WORKER_CLS
    lora_resolver.apply(cfg)
    openai_errors.apply()
    # The paged kernels' grid does not depend on the number of active adapters and they exit
    # early for tokens without one: one set of LoRA graphs serves every step.
    cc = args.compilation_config
    if isinstance(cc, dict):
        cc.setdefault("cudagraph_specialize_lora", False)
    elif hasattr(cc, "cudagraph_specialize_lora"):
        cc.cudagraph_specialize_lora = False


def lora_flag_overrides(args: Any, cfg: SLoRAConfig, plugin_values: dict[str, int]) -> list[str]:
    """One phrase per vLLM LoRA flag the user set (not its EngineArgs default) to a value the
    plugin replaces: a user who passed --max-loras 4 should learn that 4 is not what runs, and
    which slora setting to change instead. A flag set to its default is indistinguishable from
    an unset one and is not reported."""
    fields = type(args).__dataclass_fields__
    phrases = []
    for name, setting in OVERRIDDEN_FLAGS.items():
        user, used = getattr(args, name), plugin_values[name]
        if user == getattr(fields[name], "default", None) or user == used:
            continue
        phrases.append(f"--{name.replace('_', '-')} {user} -> {used} "
                       f"(slora.{setting} = {getattr(cfg, setting)})")
    return phrases


def log_overridden_flags(phrases: list[str]) -> None:
    """Log the overridden flags as one warning line, once per process for a given line."""
    if not phrases:
        return
    line = ("slora: the plugin sets vLLM's LoRA flags from its own settings, ignoring "
            + "; ".join(phrases) + "; change the slora.* settings instead")
    if line not in _logged_overrides:
        _logged_overrides.add(line)
        logger.warning(line)


def configure_lora_targets(vllm_config: Any, cfg: SLoRAConfig) -> None:
    """Set `LoRAConfig.target_modules` to the modules that get LoRA layers, once, in the process
    that builds the config (the engine core and the workers receive it with the config)."""
    from slora_plugin.adapters.targets import choose_target_modules
    from slora_plugin.layout import ModelDims

    hf = vllm_config.model_config.hf_config
    lora_config = vllm_config.lora_config
    choice = choose_target_modules(cfg, ModelDims.from_hf_config(hf), lora_config.target_modules)
    lora_config.target_modules = list(choice.target_modules) if choice.target_modules else None
    logger.info("slora: LoRA layers on %s; %s", ", ".join(choice.wrapped), choice.reason)


def configure_vllm_config(vllm_config: Any) -> None:
    """After the config is built: the scheduler variant matching the final async_scheduling."""
    sc = vllm_config.scheduler_config
    sc.scheduler_cls = SCHEDULER_CLS[bool(sc.async_scheduling)]


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_slora_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        warning = unwrapped_keys_warning(self.additional_config)
        if warning:
            logger.warning("slora: %s", warning)
        cfg = load_config(self.additional_config)
        if cfg is None:
            return original(self, *args, **kwargs)
        configure_engine_args(self, cfg)
        vllm_config = original(self, *args, **kwargs)
        configure_vllm_config(vllm_config)
        configure_lora_targets(vllm_config, cfg)
        return vllm_config

    create_engine_config._slora_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config
