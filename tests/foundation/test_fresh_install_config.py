"""Fresh-install mistakes with the switch: broken JSON makes `doctor` say one line and exit,
plugin keys without the "slora" wrapper are warned about (doctor and engine start), and vLLM
LoRA flags the plugin overrides are named in one log line."""

from __future__ import annotations

import logging

import pytest

from slora_plugin import cli
from slora_plugin.config import ENV_CONFIG, SLoRAConfig


@pytest.fixture
def engine_log(monkeypatch, caplog):
    """caplog sees the engine_args logger (vLLM's loggers print through their own handler)."""
    from vllm.logger import init_logger

    monkeypatch.setattr(init_logger("vllm.slora.engine_args"), "propagate", True)
    caplog.set_level(logging.INFO, logger="vllm.slora.engine_args")
    return caplog


def _plugin_lines(caplog, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "vllm.slora.engine_args" and r.levelno >= level]


@pytest.mark.parametrize("text, expect", [
    ('{"slora": {"adapter_dir": "/a",}}', "line 1 column 32"),
    ("{slora: 1}", "line 1 column 2"),
    ('["slora"]', "expected a JSON object"),
])
def test_doctor_malformed_additional_config_is_one_line(text, expect, monkeypatch, capsys):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    assert cli.main(["doctor", "--additional-config", text]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--additional-config" in lines[0] and expect in lines[0]
    assert "Traceback" not in err


def test_doctor_malformed_environment_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv(ENV_CONFIG, '{"adapter_dir": /adapters}')
    assert cli.main(["doctor"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1
    assert ENV_CONFIG in lines[0] and "not valid JSON" in lines[0] and "column 17" in lines[0]


def test_doctor_warns_about_settings_without_the_wrapper(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    cli.main(["doctor", "--additional-config", f'{{"adapter_dir": "{tmp_path}", "other": 1}}'])
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "['adapter_dir']" in warnings[0] and '{"slora": {"adapter_dir": ...}}' in warnings[0]
    assert "off (vLLM runs as stock)" in out


def test_engine_start_warns_about_settings_without_the_wrapper(tiny_model_dir, tmp_path,
                                                               cpu_platform, monkeypatch, engine_log):
    import slora_plugin
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv("VLLM_SLORA_ADAPTER_DIR", raising=False)
    slora_plugin.register()
    args = EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
                      additional_config={"max_lora_rank": 64, "some_other_plugin": True})
    vc = args.create_engine_config()
    assert vc.lora_config is None  # still stock: a warning, not an error
    warned = _plugin_lines(engine_log, logging.WARNING)
    assert len(warned) == 1 and "['max_lora_rank']" in warned[0]
    assert '{"slora": {"max_lora_rank": ...}}' in warned[0]


def test_other_plugins_keys_are_not_warned_about(tiny_model_dir, cpu_platform, monkeypatch,
                                                 engine_log):
    import slora_plugin
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv("VLLM_SLORA_ADAPTER_DIR", raising=False)
    slora_plugin.register()
    EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
               additional_config={"some_other_plugin": {"rank": 4}}).create_engine_config()
    assert not _plugin_lines(engine_log, logging.WARNING)


def test_overridden_lora_flags_are_logged_once(tiny_model_dir, monkeypatch, engine_log):
    from vllm.engine.arg_utils import EngineArgs

    from slora_plugin.patches import engine_args

    monkeypatch.setattr(engine_args, "_logged_overrides", set())
    cfg = SLoRAConfig(max_adapters_per_step=32, max_lora_rank=48)
    for _ in range(2):  # a second engine with the same flags in the same process
        args = EngineArgs(model=tiny_model_dir, max_loras=4, max_cpu_loras=8, max_lora_rank=256)
        engine_args.configure_engine_args(args, cfg)
        assert (args.max_loras, args.max_cpu_loras, args.max_lora_rank) == (32, 32, 64)
    lines = [line for line in _plugin_lines(engine_log) if "LoRA flags" in line]
    assert len(lines) == 1
    for phrase in ("--max-loras 4 -> 32 (slora.max_adapters_per_step = 32)",
                   "--max-cpu-loras 8 -> 32 (slora.max_adapters_per_step = 32)",
                   "--max-lora-rank 256 -> 64 (slora.max_lora_rank = 48)"):
        assert phrase in lines[0]


def test_flags_left_at_their_defaults_are_not_reported(tiny_model_dir, monkeypatch, engine_log):
    from vllm.engine.arg_utils import EngineArgs

    from slora_plugin.patches import engine_args

    monkeypatch.setattr(engine_args, "_logged_overrides", set())
    args = EngineArgs(model=tiny_model_dir, max_lora_rank=128)  # the value the plugin uses anyway
    engine_args.configure_engine_args(args, SLoRAConfig())
    assert not [line for line in _plugin_lines(engine_log) if "LoRA flags" in line]
