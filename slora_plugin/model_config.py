"""The base model's config.json: reading and writing it, and the sizes that follow from it.

The harness (`slora_plugin.bench`), `slora-plugin doctor`, the GPU scripts and the tests all
need a model's dimensions from a config.json without loading the model (the benchmarks run
dummy weights) and without importing transformers; this module serves them all, so none of
them has to import the harness for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

from slora_plugin.layout import ModelDims

#: Llama-2-7B's config.json (no download needed: the benchmarks use dummy weights).
LLAMA_2_7B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

KNOWN_MODELS: dict[str, dict[str, Any]] = {"llama-2-7b": LLAMA_2_7B}

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class ModelConfigError(ValueError):
    """A model config that cannot be found, read or understood; the message names it."""


def write_model_config(directory: str, config: Mapping[str, Any] = LLAMA_2_7B) -> str:
    """Write `config.json` (no weights: vLLM runs it with load_format='dummy')."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    return directory


def load_model_config(model: str) -> dict[str, Any]:
    """A known model name ('llama-2-7b'), a directory with config.json, or a config.json path."""
    if model.lower() in KNOWN_MODELS:
        return dict(KNOWN_MODELS[model.lower()])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelConfigError(f"model {model!r}: not a known name {sorted(KNOWN_MODELS)} and "
                               f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"model {model!r}: cannot read {path} ({e})") from None


def load_model_dims(model: str) -> ModelDims:
    """The dimensions of `model` (anything `load_model_config` takes), checked as ModelMemory does."""
    return ModelMemory.from_config(load_model_config(model)).dims


@dataclass(frozen=True)
class ModelMemory:
    """The sizes the memory plan needs, from an HF config dict."""

    dims: ModelDims
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelMemory":
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                               "num_hidden_layers", "vocab_size") if k not in cfg]
        if missing:
            raise ModelConfigError(f"model config lacks {missing}")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
        if dtype not in DTYPE_BYTES:
            raise ModelConfigError(f"model config: unsupported dtype {dtype!r}; known {sorted(DTYPE_BYTES)}")
        return cls(ModelDims.from_hf_config(SimpleNamespace(**cfg)), int(cfg["vocab_size"]),
                   bool(cfg.get("tie_word_embeddings", False)), DTYPE_BYTES[dtype])

    @property
    def weight_bytes(self) -> int:
        """Parameters of a Llama-style decoder (embeddings, attention, gated MLP, norms)."""
        d = self.dims
        per_layer = d.linear_params_per_layer + 2 * d.hidden_size
        emb = self.vocab_size * d.hidden_size * (1 if self.tie_word_embeddings else 2)
        return (d.num_hidden_layers * per_layer + emb + d.hidden_size) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.dims.kv_elems_per_token * self.dtype_bytes

    def page_size_bytes(self, block_size: int = 16) -> int:
        """One layer's slice of one KV block (K and V): the plugin's page."""
        d = self.dims
        return 2 * block_size * d.num_key_value_heads * d.head_dim * self.dtype_bytes

    def page_elems(self, block_size: int = 16) -> int:
        return self.page_size_bytes(block_size) // self.dtype_bytes
