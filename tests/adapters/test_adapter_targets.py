"""Which vLLM modules get LoRA layers: the union of what the directory's adapters target (read
the way the store validates them), and the refusal of a later adapter outside that set."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slora_plugin.adapters import AdapterError, AdapterStore
from slora_plugin.adapters.peft_format import (CONFIG_NAME, WEIGHTS_NAME, adapter_config,
                                               write_random_adapter)
from slora_plugin.adapters.targets import (ALL_PACKED, choose_target_modules, packed_modules,
                                           survey_directory, wrapped_modules)
from slora_plugin.config import SLoRAConfig, SLoRAConfigError


def _write(root, name: str, targets, **extra) -> str:
    """A PEFT adapter whose config is exactly `adapter_config(8, 16, targets, **extra)`; the
    weights file only has to exist for config-level validation."""
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(adapter_config(8, 16, targets, **extra), f)
    with open(os.path.join(path, WEIGHTS_NAME), "wb") as f:
        f.write(b"")
    return path


def _store(root, dims, targets=None) -> AdapterStore:
    return AdapterStore(dims, 512, torch.float16, adapter_dir=str(root), max_rank=32,
                        host_cache_bytes=0, loader_threads=1, lora_target_modules=targets)


@pytest.mark.parametrize("targets, extra, expected", [
    (["q_proj", "v_proj"], {}, ("qkv_proj",)),
    (["o_proj"], {}, ("o_proj",)),
    (["gate_proj", "up_proj", "down_proj"], {}, ("gate_up_proj", "down_proj")),
    (["up_proj"], {}, ("gate_up_proj",)),
    (r"model\.layers\.1\.mlp\.down_proj", {}, ("down_proj",)),
    (r".*\.(k_proj|o_proj)", {}, ("qkv_proj", "o_proj")),
    (["o_proj", "down_proj"], {"layers_to_transform": [1]}, ("o_proj", "down_proj")),
    # rank_pattern changes ranks, never adds a module: down_proj is not a target here
    (["q_proj"], {"rank_pattern": {"down_proj": 4, "q_proj": 2}}, ("qkv_proj",)),
    (["q_proj", "down_proj"], {"exclude_modules": ["down_proj"]}, ("qkv_proj",)),
    ("all-linear", {}, ALL_PACKED),
])
def test_one_adapter(tmp_path, tiny_dims, targets, extra, expected):
    _write(tmp_path, "a", targets, **extra)
    assert survey_directory(str(tmp_path), tiny_dims, 32).modules == expected
    # the same answer as the store's own validation (one mapping)
    assert packed_modules(_store(tmp_path, tiny_dims).spec("a").ranks) == expected


def test_union_over_directory_and_broken_skipped(tmp_path, tiny_dims):
    _write(tmp_path, "qv", ["q_proj", "v_proj"])
    _write(tmp_path, "org/o", ["o_proj"])
    _write(tmp_path, "dora", ["down_proj"], use_dora=True)
    _write(tmp_path, "no-layer", ["gate_proj"], layers_to_transform=[7])  # matches nothing
    os.makedirs(tmp_path / "bad-json")
    (tmp_path / "bad-json" / CONFIG_NAME).write_text("{not json")
    survey = survey_directory(str(tmp_path), tiny_dims, 32)
    assert survey.modules == ("qkv_proj", "o_proj")
    assert sorted(survey.skipped) == ["bad-json", "dora", "no-layer"]
    assert survey.total == survey.read == 5


def test_reading_stops_once_every_module_is_targeted(tmp_path, tiny_dims):
    _write(tmp_path, "a-all", "all-linear")
    for i in range(5):
        _write(tmp_path, f"b{i}", ["q_proj"])
    survey = survey_directory(str(tmp_path), tiny_dims, 32)
    assert survey.modules == ALL_PACKED and survey.read == 1 and survey.total == 6


def test_wrapped_modules_follows_vllms_rule():
    assert wrapped_modules(None) == ALL_PACKED
    assert wrapped_modules(["qkv_proj", "o_proj"]) == ("qkv_proj", "o_proj")
    assert wrapped_modules(["v_proj", "down_proj"]) == ("qkv_proj", "down_proj")
    assert wrapped_modules(["gate_up_proj"]) == ("gate_up_proj",)


def test_choice(tmp_path, tiny_dims):
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    _write(full, "qv", ["q_proj", "v_proj"])
    _write(full, "mlp", ["down_proj"])

    c = choose_target_modules(SLoRAConfig(), tiny_dims)
    assert c.target_modules is None and c.wrapped == ALL_PACKED and "no slora.adapter_dir" in c.reason
    c = choose_target_modules(SLoRAConfig(adapter_dir=str(empty)), tiny_dims)
    assert c.target_modules is None and "no valid adapter" in c.reason
    c = choose_target_modules(SLoRAConfig(adapter_dir=str(full)), tiny_dims)
    assert c.target_modules == ("qkv_proj", "down_proj") and "2 adapters" in c.reason
    c = choose_target_modules(SLoRAConfig(adapter_dir=str(full), target_modules=("o_proj",)), tiny_dims)
    assert c.target_modules == ("o_proj",) and c.reason == "set by slora.target_modules"
    c = choose_target_modules(SLoRAConfig(adapter_dir=str(full)), tiny_dims, ["q_proj"])
    assert c.target_modules == ("q_proj",) and c.wrapped == ("qkv_proj",) and "vLLM" in c.reason
    with pytest.raises(SLoRAConfigError, match="slora.target_modules.*lm_head"):
        choose_target_modules(SLoRAConfig(target_modules=("qkv_proj", "lm_head")), tiny_dims)


def test_adapter_outside_wrapped_set_refused(tmp_path, tiny_dims):
    _write(tmp_path, "attn", ["q_proj", "o_proj"])
    store = _store(tmp_path, tiny_dims, ["qkv_proj", "o_proj"])
    assert store.spec("attn").ranks == {"q_proj": 8, "o_proj": 8}
    # added to the directory while serving
    _write(tmp_path, "org/mlp", ["q_proj", "down_proj"])
    with pytest.raises(AdapterError) as e:
        store.spec("org/mlp")
    assert e.value.adapter == "org/mlp" and e.value.file == CONFIG_NAME
    msg = str(e.value)
    assert "down_proj" in msg and "set slora.target_modules to include down_proj and restart" in msg
    assert '["qkv_proj", "o_proj", "down_proj"]' in msg
    # named by absolute path, outside the directory
    outside = _write(tmp_path.parent / f"{tmp_path.name}-other", "gu", ["gate_proj"])
    with pytest.raises(AdapterError, match="include gate_up_proj and restart"):
        store.spec(outside)
    # remembered like any other config-level refusal; the other adapters are untouched
    assert store.stats()["specs_bad"] == 2
    assert store.spec("attn").num_pages >= 1


def test_real_adapter_refused_before_any_weight_is_read(tmp_path, tiny_dims):
    write_random_adapter(str(tmp_path / "mlp"), tiny_dims, 4, ["down_proj"])
    store = AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=32,
                         host_cache_bytes=1 << 20, loader_threads=1, lora_target_modules=["o_proj"])
    with store, pytest.raises(AdapterError, match="no LoRA layer in this engine"):
        store.get("mlp")
