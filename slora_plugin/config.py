"""The plugin's one switch and its typed settings.

The same settings arrive two ways: `additional_config={"slora": {...}}` (offline `LLM(...)` and
`vllm serve --additional-config`) or the environment (`VLLM_SLORA_CONFIG` holding the same JSON
object, or just `VLLM_SLORA_ADAPTER_DIR`), for deployments where the command line is fixed.
`additional_config` wins when both are given. Parsing is strict: a typo in a key silently falling
back to a default is exactly the kind of "it ran, but on the base model" failure users hate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

ENV_CONFIG = "VLLM_SLORA_CONFIG"
ENV_ADAPTER_DIR = "VLLM_SLORA_ADAPTER_DIR"
ADDITIONAL_CONFIG_KEY = "slora"

#: Environment variables the plugin reads; registered with vLLM so it does not warn about them.
ENV_VARS: dict[str, str] = {
    ENV_CONFIG: "JSON object with the plugin's settings (same keys as additional_config['slora']).",
    ENV_ADAPTER_DIR: "Directory of PEFT adapters; setting it alone enables the plugin.",
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
               "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


class SLoRAConfigError(ValueError):
    """A setting of the plugin is wrong; the message names the key."""


class MalformedConfigError(SLoRAConfigError):
    """The settings' JSON text itself is broken (syntax, or not an object): nothing of it can be
    read, so callers such as `doctor` stop with this one line instead of reporting further."""


def parse_json_object(text: str, where: str) -> dict[str, Any]:
    """`text` parsed as a JSON object; MalformedConfigError naming `where` (the flag or variable
    the text came from) and the decoder's position, so a quoting mistake is found at once."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedConfigError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MalformedConfigError(f"{where}: expected a JSON object, got {value!r}")
    return value


def parse_bytes(value: int | str, key: str) -> int:
    """Accept 8589934592, "8GiB", "8 GB", "512MiB"; reject anything else, naming the key."""
    if isinstance(value, bool):
        raise SLoRAConfigError(f"slora.{key}: expected a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SLoRAConfigError(f"slora.{key}: must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper().rstrip("B")
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise SLoRAConfigError(f"slora.{key}: expected a byte count such as 8589934592 or '8GiB', got {value!r}")


@dataclass(frozen=True)
class SLoRAConfig:
    """Settings of the plugin. Every field is a key of `additional_config['slora']`."""

    #: Directory of adapters, one sub-directory each (`adapter_config.json` + safetensors).
    #: None: requests must name an adapter by its full path (`LoRARequest.lora_path`).
    adapter_dir: str | None = None
    #: Largest rank accepted for any module of any adapter. It does not size any buffer by
    #: itself (no padding); it bounds the kernels' rank tiles and the row-address tables.
    max_lora_rank: int = 128
    #: Most distinct adapters in one engine step: the kernels' metadata ceiling, not GPU slots.
    max_adapters_per_step: int = 128
    #: Pinned host memory for packed adapters (LRU beyond it).
    host_cache_bytes: int = 8 * 2**30
    #: Threads reading and packing adapters from disk.
    loader_threads: int = 4
    #: Queued requests whose adapters are prefetched into host memory ahead of admission;
    #: 0 also turns off admission by host readiness.
    prefetch_depth: int = 64
    #: Admit a request only once its adapter's host copy is ready (S-LoRA's rule; needs the
    #: worker in the scheduler's process, tensor parallel 1). Off by default: on the H100 with
    #: 1,000 adapters submitted at once, holding requests back cost more throughput (1,939-2,485
    #: out tok/s) than the blocking loads it avoids (3,035 without it); see benchmarks/results.
    admission_by_host_readiness: bool = False
    #: Admission by adapter bytes (slora_plugin/pool/admission_budget.py): a waiting request whose
    #: adapter is not in the running batch is admitted only while the batch's adapter bytes stay
    #: within this fraction of the base weights' bytes a step reads (e.g. 0.5), or once it has
    #: been held `max_admission_wait_steps` steps. None (default): off, admission as vLLM's.
    adapter_bytes_per_step_budget: float | None = None
    #: Steps the adapter-bytes budget may hold one request back at most (bounded waiting).
    max_admission_wait_steps: int = 128
    #: vLLM modules that get paged LoRA (qkv_proj, o_proj, gate_up_proj, down_proj; PEFT names
    #: select their fused module). None: the modules the adapters in adapter_dir target at engine
    #: start (every module without adapters); see slora_plugin/adapters/targets.py.
    target_modules: tuple[str, ...] | None = None
    #: Skip the exact-version check (the name/signature guard still runs). For porting only.
    allow_untested_vllm: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "SLoRAConfig":
        """Parse and validate; the first problem raises, naming its key."""
        if not isinstance(raw, Mapping):
            raise SLoRAConfigError(f"slora: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | {"enabled"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SLoRAConfigError(
                f"slora: unknown key(s) {unknown}; known keys are {sorted(known)}")
        kw: dict[str, Any] = {}
        for key in ("max_lora_rank", "max_adapters_per_step", "loader_threads", "prefetch_depth",
                    "max_admission_wait_steps"):
            if key in raw:
                kw[key] = _positive_int(raw[key], key, allow_zero=key == "prefetch_depth")
        if raw.get("adapter_bytes_per_step_budget") is not None:
            kw["adapter_bytes_per_step_budget"] = _positive_number(
                raw["adapter_bytes_per_step_budget"], "adapter_bytes_per_step_budget")
        if "host_cache_bytes" in raw:
            kw["host_cache_bytes"] = parse_bytes(raw["host_cache_bytes"], "host_cache_bytes")
        for key in ("allow_untested_vllm", "admission_by_host_readiness"):
            if key in raw:
                kw[key] = _bool(raw[key], key)
        if "target_modules" in raw and raw["target_modules"] is not None:
            tm = raw["target_modules"]
            if not isinstance(tm, (list, tuple)) or not all(isinstance(m, str) for m in tm) or not tm:
                raise SLoRAConfigError(
                    f"slora.target_modules: expected a non-empty list of module names, got {tm!r}")
            kw["target_modules"] = tuple(tm)
        if raw.get("adapter_dir") is not None:
            kw["adapter_dir"] = _readable_dir(raw["adapter_dir"])
        return cls(**kw)


def _positive_int(value: Any, key: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        lo = "a non-negative" if allow_zero else "a positive"
        raise SLoRAConfigError(f"slora.{key}: expected {lo} integer, got {value!r}")
    return value


def _positive_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float("inf"):
        raise SLoRAConfigError(f"slora.{key}: expected a positive number, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise SLoRAConfigError(f"slora.{key}: expected true or false, got {value!r}")
    return value


def _readable_dir(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SLoRAConfigError(f"slora.adapter_dir: expected a directory path, got {value!r}")
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(path):
        raise SLoRAConfigError(f"slora.adapter_dir: {path} does not exist or is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SLoRAConfigError(f"slora.adapter_dir: {path} is not readable")
    return path


def raw_settings(additional_config: Mapping[str, Any] | None,
                 environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The unparsed settings if the plugin is switched on, else None.

    On when `additional_config` has a "slora" object (unless it says `"enabled": false`), or,
    failing that, when `VLLM_SLORA_CONFIG` or `VLLM_SLORA_ADAPTER_DIR` is set.
    """
    if additional_config and ADDITIONAL_CONFIG_KEY in additional_config:
        raw = additional_config[ADDITIONAL_CONFIG_KEY]
        if raw is True:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SLoRAConfigError(
                f"additional_config['slora']: expected a JSON object, got {raw!r}")
    elif environ.get(ENV_CONFIG):
        raw = parse_json_object(environ[ENV_CONFIG], ENV_CONFIG)
    elif environ.get(ENV_ADAPTER_DIR):
        raw = {}
    else:
        return None
    raw = dict(raw)
    if environ.get(ENV_ADAPTER_DIR) and "adapter_dir" not in raw:
        raw["adapter_dir"] = environ[ENV_ADAPTER_DIR]
    enabled = raw.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise SLoRAConfigError(f"slora.enabled: expected true or false, got {enabled!r}")
    return raw if enabled else None


def unwrapped_keys_warning(additional_config: Any) -> str | None:
    """A warning when `additional_config` has plugin settings at its top level, else None.

    vLLM's additional_config is shared by every plugin, so the plugin reads only its "slora"
    object; `{"adapter_dir": ...}` without the wrapper would otherwise run stock vLLM without a
    word. Only keys that are SLoRAConfig fields count (other plugins own the rest)."""
    if not isinstance(additional_config, Mapping):
        return None
    fields = {f.name for f in dataclasses.fields(SLoRAConfig)}
    ours = sorted(k for k in additional_config if k in fields)
    if not ours:
        return None
    inner = ", ".join(f"{json.dumps(k)}: ..." for k in ours)
    return (f"additional_config has slora-plugin setting(s) {ours} at its top level, where the "
            f"plugin does not read them; wrap them as {{\"{ADDITIONAL_CONFIG_KEY}\": {{{inner}}}}}")


def load_config(additional_config: Mapping[str, Any] | None,
                environ: Mapping[str, str] = os.environ) -> SLoRAConfig | None:
    """The parsed settings if the plugin is switched on, else None (vLLM runs as stock)."""
    raw = raw_settings(additional_config, environ)
    return None if raw is None else SLoRAConfig.from_mapping(raw)



def engine_settings(vllm_config: Any) -> SLoRAConfig:
    """The settings the engine runs with, as `patches/engine_args.py` wrote them into
    `additional_config` in the process that built the config (the scheduler and the workers may
    live in other processes, with another environment: they must not re-read it).

    The one reader for the plugin's own classes, so that they can never disagree; raises if the
    plugin is off in that config (the scheduler or worker class was set without the switch).
    """
    cfg = load_config(getattr(vllm_config, "additional_config", None), environ={})
    if cfg is None:
        raise SLoRAConfigError(
            "slora-plugin's scheduler or worker was started but additional_config has no enabled "
            "'slora' settings: enable the plugin with additional_config={'slora': {...}} or "
            f"{ENV_ADAPTER_DIR} / {ENV_CONFIG}, not by setting worker_cls or scheduler_cls alone")
    return cfg
