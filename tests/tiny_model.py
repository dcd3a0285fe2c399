"""The tiny Llama-style model config shared by tests (importable as `tiny_model`: the name
`conftest` is ambiguous once sub-directories have their own conftest.py)."""

from __future__ import annotations

from slora_plugin.model_config import write_model_config as _write_config

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
    return _write_config(directory, {**TINY_LLAMA, **(overrides or {})})
