"""Fixtures shared by every test: a tiny Llama-style model config and PEFT adapters on disk."""

from __future__ import annotations

import json
import os

import pytest

from slora_plugin.layout import ModelDims

#: A Llama-style config small enough for CPU tests but with GQA (4 query heads, 2 KV heads).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def write_model_config(directory: str, overrides: dict | None = None) -> str:
    """Write a config.json (no weights: tests use load_format='dummy' or only the config)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**TINY_LLAMA, **(overrides or {})}, f, indent=2)
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path) -> str:
    return write_model_config(str(tmp_path / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dims() -> ModelDims:
    from types import SimpleNamespace

    return ModelDims.from_hf_config(SimpleNamespace(**TINY_LLAMA))


@pytest.fixture
def cpu_platform(monkeypatch):
    """Let vLLM build engine configs on a machine without a GPU (its platform is 'unspecified')."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "cpu", raising=False)
    return current_platform


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import problem means no GPU for the tests
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run benchmarks/gpu_run.sh on the H100")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
