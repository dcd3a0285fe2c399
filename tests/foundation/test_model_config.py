"""Model config reading: known names, directories and files, and the sizes that follow."""

from __future__ import annotations

import json
import os

import pytest

from slora_plugin.model_config import (
    LLAMA_2_7B, ModelConfigError, ModelMemory, load_model_config, load_model_dims, write_model_config)

GIB = 2**30
MEM = ModelMemory.from_config(LLAMA_2_7B)


def test_llama_2_7b_sizes():
    assert MEM.weight_bytes / GIB == pytest.approx(12.55, abs=0.01)  # "Model loading took 12.55 GiB"
    assert MEM.kv_bytes_per_token == 512 * 1024
    assert MEM.page_size_bytes(16) == 2 * 16 * 32 * 128 * 2


def test_model_config_sources(tmp_path):
    assert load_model_config("Llama-2-7B") == LLAMA_2_7B
    d = write_model_config(str(tmp_path / "m"), {**LLAMA_2_7B, "num_key_value_heads": 8})
    assert load_model_config(d)["num_key_value_heads"] == 8
    with pytest.raises(ModelConfigError, match="not a known name"):
        load_model_config(str(tmp_path / "nope"))


def test_model_dims_are_checked(tmp_path):
    d = write_model_config(str(tmp_path / "m"), {**LLAMA_2_7B, "num_key_value_heads": 8})
    dims = load_model_dims(os.path.join(d, "config.json"))
    assert (dims.num_hidden_layers, dims.num_key_value_heads, dims.head_dim) == (32, 8, 128)
    assert load_model_dims("llama-2-7b") == MEM.dims
    bad = write_model_config(str(tmp_path / "bad"), {"hidden_size": 64})
    with pytest.raises(ModelConfigError, match="model config lacks"):
        load_model_dims(bad)
    fp8 = write_model_config(str(tmp_path / "fp8"), {**LLAMA_2_7B, "torch_dtype": "float8_e4m3fn"})
    with pytest.raises(ModelConfigError, match="unsupported dtype 'float8_e4m3fn'"):
        load_model_dims(fp8)


def test_gpu_scripts_model_config_matches_the_harness():
    """The GPU smoke/isolation scripts read benchmarks/configs/llama-2-7b; the harness writes
    model_config.LLAMA_2_7B. Both describe the model every result is compared on: they must agree."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs", "llama-2-7b",
                        "config.json")
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == LLAMA_2_7B
