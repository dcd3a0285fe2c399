"""Installed but not enabled, vLLM is stock; enabled, it gets the plugin's settings."""

from __future__ import annotations

import importlib.metadata

import pytest

import slora_plugin


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "slora_plugin:register" for ep in eps)


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    slora_plugin.register()
    first = EngineArgs.create_engine_config
    slora_plugin._registered = False  # as if another process imported it afresh
    slora_plugin.register()
    assert EngineArgs.create_engine_config is first
    assert not hasattr(first.__wrapped__, "__wrapped__")


def test_env_vars_registered_with_vllm():
    import vllm.envs

    slora_plugin.register()
    assert "VLLM_SLORA_CONFIG" in vllm.envs.environment_variables
    assert "VLLM_SLORA_ADAPTER_DIR" in vllm.envs.environment_variables


def _summary(vc):
    return (vc.compute_hash(), vc.lora_config, vc.scheduler_config.scheduler_cls,
            vc.parallel_config.worker_cls, dict(vc.additional_config or {}))


def test_not_enabled_means_stock(tiny_model_dir, cpu_platform, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("VLLM_SLORA_CONFIG", raising=False)
    monkeypatch.delenv("VLLM_SLORA_ADAPTER_DIR", raising=False)
    slora_plugin.register()
    wrapped = EngineArgs.create_engine_config
    assert getattr(wrapped, "_slora_wrapped", False)

    def make():
        return EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy")

    assert _summary(wrapped(make())) == _summary(wrapped.__wrapped__(make()))


def test_enabled_turns_on_paged_lora(tiny_model_dir, tmp_path, cpu_platform):
    from vllm.engine.arg_utils import EngineArgs

    slora_plugin.register()
    args = EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
                      additional_config={"slora": {"adapter_dir": str(tmp_path), "max_lora_rank": 48,
                                                   "max_adapters_per_step": 200}})
    vc = args.create_engine_config()
    assert vc.lora_config is not None
    assert vc.lora_config.max_lora_rank == 64  # smallest vLLM rank >= 48
    assert vc.lora_config.max_loras == 200
    assert vc.additional_config["slora"]["adapter_dir"] == str(tmp_path)


def test_bad_setting_stops_start(tiny_model_dir, cpu_platform):
    from vllm.engine.arg_utils import EngineArgs

    from slora_plugin.config import SLoRAConfigError

    slora_plugin.register()
    args = EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
                      additional_config={"slora": {"max_lora_rnak": 8}})
    with pytest.raises(SLoRAConfigError, match="max_lora_rnak"):
        args.create_engine_config()
