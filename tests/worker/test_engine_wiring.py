"""The plugin's engine-args hook selects the paged worker and one set of LoRA CUDA graphs."""

from __future__ import annotations

from types import SimpleNamespace

from slora_plugin.config import SLoRAConfig
from slora_plugin.patches.engine_args import WORKER_CLS, configure_engine_args, configure_vllm_config


def test_worker_and_cudagraph_settings(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_model_dir)
    configure_engine_args(args, SLoRAConfig(max_adapters_per_step=4))
    assert args.worker_cls == WORKER_CLS and args.enable_lora and args.max_loras == 4
    assert args.compilation_config.cudagraph_specialize_lora is False


def test_scheduler_variant_follows_async_scheduling():
    """The class is named by its dotted path (patches/ never imports pool/); vLLM's engine core
    resolves that name to the subclass matching the mode."""
    from vllm.config.scheduler import SchedulerConfig

    from slora_plugin.pool.scheduler import scheduler_class

    for async_ in (True, False):
        vc = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_,
                                                              scheduler_cls=None))
        configure_vllm_config(vc)
        assert isinstance(vc.scheduler_config.scheduler_cls, str)
        resolved = SchedulerConfig.get_scheduler_cls(vc.scheduler_config)
        assert resolved is scheduler_class(async_)
