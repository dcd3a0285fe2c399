"""The switch and the typed config: strict parsing, clear errors naming the key."""

from __future__ import annotations

import json

import pytest

from slora_plugin.config import (ENV_ADAPTER_DIR, ENV_CONFIG, SLoRAConfig, SLoRAConfigError,
                                 load_config, parse_bytes)


def test_off_without_switch():
    assert load_config(None, environ={}) is None
    assert load_config({"other": 1}, environ={}) is None


def test_additional_config_parses(tmp_path):
    cfg = load_config({"slora": {"adapter_dir": str(tmp_path), "max_lora_rank": 64,
                                 "host_cache_bytes": "2GiB", "target_modules": ["qkv_proj"]}},
                      environ={})
    assert cfg == SLoRAConfig(adapter_dir=str(tmp_path), max_lora_rank=64,
                              host_cache_bytes=2 * 2**30, target_modules=("qkv_proj",))


def test_enabled_false_turns_it_off(tmp_path):
    assert load_config({"slora": {"enabled": False, "adapter_dir": str(tmp_path)}}, environ={}) is None


@pytest.mark.parametrize("raw, key", [
    ({"adapter_dirr": "/x"}, "adapter_dirr"),
    ({"max_lora_rank": "64"}, "max_lora_rank"),
    ({"max_lora_rank": 0}, "max_lora_rank"),
    ({"max_adapters_per_step": True}, "max_adapters_per_step"),
    ({"host_cache_bytes": "lots"}, "host_cache_bytes"),
    ({"target_modules": "qkv_proj"}, "target_modules"),
    ({"allow_untested_vllm": 1}, "allow_untested_vllm"),
    ({"admission_by_host_readiness": "on"}, "admission_by_host_readiness"),
    ({"adapter_bytes_per_step_budget": 0}, "adapter_bytes_per_step_budget"),
    ({"adapter_bytes_per_step_budget": "0.5"}, "adapter_bytes_per_step_budget"),
    ({"adapter_bytes_per_step_budget": True}, "adapter_bytes_per_step_budget"),
    ({"max_admission_wait_steps": 0}, "max_admission_wait_steps"),
    ({"adapter_dir": "/definitely/not/here"}, "adapter_dir"),
    ({"enabled": "yes"}, "enabled"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(SLoRAConfigError, match=key):
        load_config({"slora": raw}, environ={})


def test_unreadable_adapter_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda *a, **k: False)
    with pytest.raises(SLoRAConfigError, match="adapter_dir.*not readable"):
        load_config({"slora": {"adapter_dir": str(tmp_path)}}, environ={})


def test_environment_forms(tmp_path):
    env = {ENV_CONFIG: json.dumps({"max_lora_rank": 32}), ENV_ADAPTER_DIR: str(tmp_path)}
    assert load_config(None, environ=env) == SLoRAConfig(adapter_dir=str(tmp_path), max_lora_rank=32)
    assert load_config(None, environ={ENV_ADAPTER_DIR: str(tmp_path)}).adapter_dir == str(tmp_path)
    with pytest.raises(SLoRAConfigError, match=ENV_CONFIG):
        load_config(None, environ={ENV_CONFIG: "{not json"})


def test_additional_config_wins_over_environment(tmp_path):
    env = {ENV_CONFIG: json.dumps({"max_lora_rank": 32})}
    assert load_config({"slora": {"max_lora_rank": 16}}, environ=env).max_lora_rank == 16


@pytest.mark.parametrize("text, n", [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                     (1024, 1024), ("100", 100)])
def test_parse_bytes(text, n):
    assert parse_bytes(text, "k") == n


def test_admission_budget_settings(tmp_path):
    assert SLoRAConfig().adapter_bytes_per_step_budget is None  # off by default
    cfg = load_config({"slora": {"adapter_bytes_per_step_budget": 1,
                                 "max_admission_wait_steps": 32}}, environ={})
    assert cfg.adapter_bytes_per_step_budget == 1.0 and cfg.max_admission_wait_steps == 32
    assert load_config({"slora": {"adapter_bytes_per_step_budget": None}},
                       environ={}).adapter_bytes_per_step_budget is None
    assert SLoRAConfig.from_mapping(cfg.to_dict()) == cfg


def test_round_trip_through_dict(tmp_path):
    cfg = SLoRAConfig(adapter_dir=str(tmp_path), target_modules=("o_proj",))
    assert SLoRAConfig.from_mapping(cfg.to_dict()) == cfg


def test_engine_settings_is_the_one_reader_and_refuses_a_config_without_the_switch(tmp_path):
    from types import SimpleNamespace

    from slora_plugin.config import engine_settings

    on = SimpleNamespace(additional_config={"slora": SLoRAConfig(adapter_dir=str(tmp_path)).to_dict()})
    assert engine_settings(on) == SLoRAConfig(adapter_dir=str(tmp_path))
    assert engine_settings(SimpleNamespace(additional_config={"slora": True})) == SLoRAConfig()
    for off in ({}, {"slora": {"enabled": False}}, None):
        with pytest.raises(SLoRAConfigError, match="no enabled 'slora' settings"):
            engine_settings(SimpleNamespace(additional_config=off))
