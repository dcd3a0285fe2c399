"""Config-level validation of a PEFT LoRA adapter against the base model (no weights read).

The result, `AdapterPlan`, says for every supported module and every layer which rank PEFT
would give it and which scale (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA). Matching follows
peft 0.21 exactly, so an adapter means here what it means in `PeftModel.from_pretrained`:
  - `target_modules`: a list (a module matches when its key equals an entry or ends with
    "." + entry) or a regex string (`re.fullmatch` on the key), or "all-linear";
  - `exclude_modules`, `layers_to_transform` (with the default `layers` pattern);
  - `rank_pattern` / `alpha_pattern`: `peft.utils.other.get_pattern_key` (first key, in file
    order, such that `re.match(rf"(.*\\.)?({key})$", module_key)`).
Keys are those of transformers' LlamaForCausalLM (`model.layers.3.self_attn.q_proj`).

Everything the plugin cannot serve exactly is refused, naming the field: an adapter silently
served as the base model (vllm#34186) is worse than an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.peft_format import CONFIG_NAME, MODULE_PARENT
from slora_plugin.layout import MODULES, ModelDims

#: Fields that change what the adapter computes in ways the paged kernels do not implement.
#: Refused when set to anything truthy.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication changes the model's layers and is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
#: Modules of the model LoRA may not target (for now), by their last key component.
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True, eq=False)
class AdapterPlan:
    """Per supported module: rank and scale in each layer (rank 0: not adapted there)."""

    layer_ranks: Mapping[str, tuple[int, ...]]
    layer_scales: Mapping[str, tuple[float, ...]]

    @property
    def ranks(self) -> dict[str, int]:
        """A module's rank in the page layout: its largest rank over the layers."""
        return {m: max(r) for m, r in self.layer_ranks.items() if max(r) > 0}


def model_module_keys(dims: ModelDims) -> dict[str, tuple[int, str] | None]:
    """Every module key of a Llama-style transformers model -> (layer, module) for the linear
    layers LoRA may target, None for the others (which exist, so PEFT could match them)."""
    keys: dict[str, tuple[int, str] | None] = {
        k: None for k in ("model", "model.embed_tokens", "model.layers", "model.norm",
                          "model.rotary_emb", "lm_head")}
    for layer in range(dims.num_hidden_layers):
        base = f"model.layers.{layer}"
        for k in (base, f"{base}.self_attn", f"{base}.mlp", f"{base}.mlp.act_fn",
                  f"{base}.input_layernorm", f"{base}.post_attention_layernorm"):
            keys[k] = None
        for m in MODULES:
            keys[f"{base}.{MODULE_PARENT[m]}.{m}"] = (layer, m)
    return keys


def load_config_json(raw_text: bytes, adapter: str) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads(raw_text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(adapter, CONFIG_NAME, f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(adapter, CONFIG_NAME, f"expected a JSON object, got {type(cfg).__name__}")
    return cfg


def check_fields(cfg: Mapping[str, Any], adapter: str, max_rank: int) -> None:
    """The checks that need no model: type, unsupported variants, r / alpha values."""
    def bad(reason: str) -> AdapterError:
        return AdapterError(adapter, CONFIG_NAME, reason)

    if cfg.get("peft_type") != "LORA":
        raise bad(f"peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field, why in UNSUPPORTED_FIELDS.items():
        if cfg.get(field):
            raise bad(f"{field} is {cfg[field]!r}: {why}")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise bad(f"bias is {bias!r}; only 'none' is supported (trained biases change the base model)")
    _rank(cfg.get("r", 8), "r", adapter, max_rank)
    _alpha(cfg.get("lora_alpha", 8), "lora_alpha", adapter)
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict):
            raise bad(f"{field} must be an object of pattern -> value, got {pattern!r}")
        for key, value in pattern.items():
            _compile(key, f"{field} key", adapter)
            if field == "rank_pattern":
                _rank(value, f"{field}[{key!r}]", adapter, max_rank)
            else:
                _alpha(value, f"{field}[{key!r}]", adapter)
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise bad(f"use_rslora must be true or false, got {cfg['use_rslora']!r}")


def plan_adapter(cfg: Mapping[str, Any], dims: ModelDims, adapter: str, max_rank: int) -> AdapterPlan:
    """Validate `cfg` (a parsed adapter_config.json) against the model; the per-layer plan."""
    check_fields(cfg, adapter, max_rank)
    keys = model_module_keys(dims)
    matched = _matched_keys(cfg, keys, adapter)
    r_default, a_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = cfg.get("use_rslora", False)
    L = dims.num_hidden_layers
    ranks = {m: [0] * L for m in MODULES}
    scales = {m: [0.0] * L for m in MODULES}
    for key in matched:
        layer, module = keys[key]  # type: ignore[misc]
        r = rank_pattern.get(_pattern_key(rank_pattern, key), r_default)
        alpha = alpha_pattern.get(_pattern_key(alpha_pattern, key), a_default)
        ranks[module][layer] = r
        scales[module][layer] = alpha / math.sqrt(r) if rslora else alpha / r
    return AdapterPlan(layer_ranks={m: tuple(v) for m, v in ranks.items() if any(v)},
                       layer_scales={m: tuple(scales[m]) for m in MODULES if any(ranks[m])})


def _matched_keys(cfg: Mapping[str, Any], keys: Mapping[str, tuple[int, str] | None],
                  adapter: str) -> list[str]:
    """The model keys PEFT would put LoRA on; errors for embeddings, non-linear modules, list
    entries that name no module, and a config that matches nothing at all."""
    def bad(reason: str) -> AdapterError:
        return AdapterError(adapter, CONFIG_NAME, reason)

    targets = cfg.get("target_modules")
    if targets is None:
        raise bad("target_modules is missing (set it to a list of module names or a regex)")
    if targets == "all-linear":
        targets = list(MODULES)
    if isinstance(targets, str):
        rx = _compile(targets, "target_modules", adapter)
        hits = [k for k in keys if rx.fullmatch(k)]
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        hits = []
        for t in targets:
            t_hits = [k for k in keys if k == t or k.endswith("." + t)]
            if not t_hits:
                raise bad(f"target_modules entry {t!r} names no module of this model "
                          f"(its LoRA modules are {list(MODULES)})")
            hits += [k for k in t_hits if k not in hits]
    else:
        raise bad(f"target_modules must be a non-empty list of names or a regex string, got {targets!r}")
    hits = [k for k in hits if not _excluded(cfg.get("exclude_modules"), k, adapter)]
    hits = _filter_layers(cfg, hits, keys, adapter)
    for k in hits:
        last = k.rsplit(".", 1)[-1]
        if last in EMBEDDING_MODULES:
            raise bad(f"target_modules selects {k!r}: LoRA on embeddings / lm_head is not supported")
        if keys[k] is None:
            raise bad(f"target_modules selects {k!r}, which is not a linear layer LoRA can adapt "
                      f"(supported: {list(MODULES)})")
    if not hits:
        raise bad(f"target_modules {cfg.get('target_modules')!r} matches no module of this model, "
                  f"so the adapter would silently change nothing")
    return hits


def _excluded(exclude: Any, key: str, adapter: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return bool(_compile(exclude, "exclude_modules", adapter).fullmatch(key))
    if isinstance(exclude, list):
        return key in exclude or any(key.endswith("." + e) for e in exclude)
    raise AdapterError(adapter, CONFIG_NAME, f"exclude_modules must be a list or a regex, got {exclude!r}")


def _filter_layers(cfg: Mapping[str, Any], hits: list[str], keys: Mapping[str, Any],
                   adapter: str) -> list[str]:
    """PEFT's `layers_to_transform` (list targets only, as in peft)."""
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == [] or isinstance(cfg.get("target_modules"), str):
        return hits
    pattern = cfg.get("layers_pattern")
    if pattern not in (None, "", [], "layers", ["layers"]):
        raise AdapterError(adapter, CONFIG_NAME, f"layers_pattern {pattern!r} is not supported "
                                                 f"(this model's layers are 'model.layers')")
    wanted = {layers} if isinstance(layers, int) else set(layers)
    return [k for k in hits if keys[k] is not None and keys[k][0] in wanted]


def _pattern_key(pattern: Mapping[str, Any], key: str) -> str:
    """peft.utils.other.get_pattern_key."""
    for p in pattern:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _compile(rx: str, field: str, adapter: str) -> re.Pattern:
    try:
        return re.compile(rx)
    except (re.error, TypeError) as e:
        raise AdapterError(adapter, CONFIG_NAME, f"{field} {rx!r} is not a valid regex ({e})") from None


def _rank(value: Any, field: str, adapter: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(adapter, CONFIG_NAME, f"{field} must be a positive integer, got {value!r}")
    if value > max_rank:
        raise AdapterError(adapter, CONFIG_NAME, f"{field} is {value}, above the configured maximum "
                                                 f"rank {max_rank} (slora.max_lora_rank)")
    return value


def _alpha(value: Any, field: str, adapter: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(adapter, CONFIG_NAME, f"{field} must be a finite number, got {value!r}")
    return float(value)
