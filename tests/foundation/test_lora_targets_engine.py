"""Engine start: LoRAConfig.target_modules is the union of the adapters' modules when
slora.target_modules is unset, the user's value when set, and every store built from the
config (the scheduler's) refuses a later adapter outside it."""

from __future__ import annotations

import logging

import pytest

import slora_plugin
from slora_plugin.adapters import AdapterError
from slora_plugin.adapters.peft_format import write_random_adapter


def _config(tiny_model_dir, slora):
    from vllm.engine.arg_utils import EngineArgs

    slora_plugin.register()
    args = EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
                      additional_config={"slora": slora})
    return args, args.create_engine_config()


@pytest.fixture
def adapter_dir(tmp_path, tiny_dims):
    root = tmp_path / "adapters"
    write_random_adapter(str(root / "qv"), tiny_dims, 4, ["q_proj", "v_proj"])
    write_random_adapter(str(root / "o"), tiny_dims, 4, ["o_proj"])
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "target_modules": ["down_proj"], "use_dora": true}')
    return root


def test_union_when_unset(tiny_model_dir, adapter_dir, tiny_dims, cpu_platform, caplog, monkeypatch):
    from vllm.logger import init_logger

    # vLLM's loggers print through their own handler; let caplog see this one too
    monkeypatch.setattr(init_logger("vllm.slora.engine_args"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="vllm.slora.engine_args"):
        args, vc = _config(tiny_model_dir, {"adapter_dir": str(adapter_dir)})
    assert args.lora_target_modules is None
    assert vc.lora_config.target_modules == ["qkv_proj", "o_proj"]
    assert vc.additional_config["slora"]["target_modules"] is None  # the user's setting, unchanged
    assert any("LoRA layers on qkv_proj, o_proj" in r.getMessage() and "1 skipped" in r.getMessage()
               for r in caplog.records)

    # an adapter added while serving, outside the wrapped set: the scheduler's store refuses it
    from slora_plugin.config import engine_settings
    from slora_plugin.pool.adapter_pages import engine_store

    write_random_adapter(str(adapter_dir / "late"), tiny_dims, 4, ["gate_proj", "up_proj"])
    store = engine_store(vc, engine_settings(vc), 512)
    assert store.spec("qv").num_pages >= 1
    with pytest.raises(AdapterError, match="'late'.*include gate_up_proj and restart"):
        store.spec("late")


def test_user_value_when_set(tiny_model_dir, adapter_dir, cpu_platform):
    args, vc = _config(tiny_model_dir, {"adapter_dir": str(adapter_dir),
                                        "target_modules": ["qkv_proj", "down_proj"]})
    assert args.lora_target_modules == ["qkv_proj", "down_proj"]
    assert vc.lora_config.target_modules == ["qkv_proj", "down_proj"]


def test_default_all_modules_without_adapters(tiny_model_dir, tmp_path, cpu_platform, monkeypatch):
    monkeypatch.delenv("VLLM_SLORA_ADAPTER_DIR", raising=False)
    monkeypatch.delenv("VLLM_SLORA_CONFIG", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    _, vc = _config(tiny_model_dir, {"adapter_dir": str(empty)})
    assert vc.lora_config.target_modules is None
    _, vc = _config(tiny_model_dir, {})
    assert vc.lora_config.target_modules is None


def test_doctor_and_plan_show_the_modules(tmp_path, tiny_model_dir, adapter_dir):
    from slora_plugin.cli import doctor_report
    from slora_plugin.bench.plan import format_plan, make_plan
    from tiny_model import TINY_LLAMA

    slora = {"slora": {"adapter_dir": str(adapter_dir)}}
    rows = dict(doctor_report(slora, tiny_model_dir)[0])
    assert rows["LoRA layers"].startswith("qkv_proj, o_proj (slora.target_modules unset")
    assert "pass --model" in dict(doctor_report(slora)[0])["LoRA layers"]
    rows, ok = doctor_report({"slora": {"target_modules": ["o_proj", "lm_head"]}})
    assert not ok and "['lm_head'] names no module" in dict(rows)["LoRA layers"]
    plan = make_plan(TINY_LLAMA, [{"q_proj": 8}, {"down_proj": 8}], kv_gib=1)
    assert plan.plugin_targets == ("qkv_proj", "down_proj")
    assert "Plugin: LoRA layers on qkv_proj,down_proj" in format_plan(plan)


def test_compressed_collection_targets_and_engine_store(tiny_model_dir, tmp_path, tiny_dims,
                                                        cpu_platform):
    """A collection in the adapter directory: its modules get LoRA layers, and the engine's
    store (scheduler and worker) gives its adapters a spec, pages included."""
    import torch

    from slora_plugin.adapters.compressed import CompressedSpec
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.config import engine_settings
    from slora_plugin.pool.adapter_pages import engine_store

    src, root = tmp_path / "src", tmp_path / "adapters"
    write_random_adapter(str(src / "a"), tiny_dims, 2, ["gate_proj", "down_proj"], seed=3)
    write_random_adapter(str(root / "o"), tiny_dims, 4, ["o_proj"])
    compress_collection(str(src), str(root / "coll"), 2, dims=tiny_dims, dtype=torch.float32)
    _, vc = _config(tiny_model_dir, {"adapter_dir": str(root)})
    assert vc.lora_config.target_modules == ["o_proj", "gate_up_proj", "down_proj"]
    spec = engine_store(vc, engine_settings(vc), 512).spec("coll/a")
    assert isinstance(spec, CompressedSpec) and spec.num_pages >= 1
