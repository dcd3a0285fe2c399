"""The job file: which adapters to train on which data, with which hyper-parameters.

JSON, parsed strictly (an unknown or mistyped field is an error naming it, never silently
ignored: a typo in `learning_rate` must not train with a default). Relative paths are relative
to the job file. One adapter's fields mirror PEFT's `LoraConfig` (r -> `rank`, `lora_alpha` ->
`alpha`, `target_modules` incl. "all-linear") and the usual trainer arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.index import check_name

SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("auto", "paged", "torch")


class JobError(ValueError):
    """The job file is not valid; the message names the field."""


@dataclass(frozen=True)
class AdapterJob:
    """One adapter to train. Exactly one of `epochs` / `steps` sets its length."""

    name: str
    data: str                            # JSONL, one sample per line: {"input_ids": [...], "labels"?: [...]}
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str  # PEFT: names (suffix match), a regex (full match), "all-linear"
    lr: float
    batch_size: int
    epochs: float | None = None
    steps: int | None = None
    seed: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0    # None: no clipping
    max_seq_len: int | None = None       # longer samples are truncated
    shuffle: bool = True


@dataclass(frozen=True)
class TrainJob:
    """A whole job: the base model, where the adapters go, and how the mixed batches run."""

    base_model: str
    output_dir: str
    adapters: tuple[AdapterJob, ...]
    dtype: str = "bfloat16"              # the frozen base's dtype (fp32 on CPU for exact tests)
    device: str | None = None            # default: cuda when available, else cpu
    backend: str = "auto"                # paged (Triton kernels) on cuda fp16/bf16, else torch
    micro_batch_tokens: int = 16384      # padded tokens per forward/backward; gradients accumulate
    checkpoint_every: int = 100
    checkpoint_dir: str | None = None    # default: <output_dir>/.slora-train (hidden from the server)
    save_dtype: str | None = None        # dtype of the saved adapters; default `dtype`
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    @property
    def state_dir(self) -> str:
        return self.checkpoint_dir or os.path.join(self.output_dir, ".slora-train")

    def fingerprint(self) -> str:
        """What a checkpoint must agree with to be resumed (paths, the device and the cadence of
        checkpoints excluded: the same job may move or resume elsewhere)."""
        d = asdict(self)
        for k in ("output_dir", "checkpoint_dir", "device", "checkpoint_every", "base_model"):
            d.pop(k)
        for a in d["adapters"]:
            a.pop("data")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def total_steps(adapter: AdapterJob, num_samples: int) -> int:
    """Steps of an adapter: `steps`, or `epochs` passes over its samples in batches."""
    if adapter.steps is not None:
        return adapter.steps
    return max(1, math.ceil(adapter.epochs * num_samples / adapter.batch_size))


def load_job(path: str) -> TrainJob:
    """Parse and check a job file."""
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise JobError(f"{path}: not valid JSON ({e})") from None
    return parse_job(raw, os.path.dirname(os.path.abspath(path)))


def parse_job(raw: Any, base_dir: str) -> TrainJob:
    """A `TrainJob` from decoded JSON; relative paths resolved against `base_dir`."""
    if not isinstance(raw, Mapping):
        raise JobError("the job must be a JSON object")
    _no_unknown(raw, TrainJob, "job")
    adapters_raw = raw.get("adapters")
    if not isinstance(adapters_raw, list) or not adapters_raw:
        raise JobError("job.adapters must be a non-empty list")
    adapters = tuple(_adapter(a, i, base_dir) for i, a in enumerate(adapters_raw))
    names = [a.name for a in adapters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JobError(f"adapter names must be unique, repeated: {dup}")
    job = TrainJob(
        base_model=_path(_req(raw, "base_model", str, "job"), base_dir),
        output_dir=_path(_req(raw, "output_dir", str, "job"), base_dir),
        adapters=adapters,
        dtype=_choice(raw, "dtype", DTYPES, "bfloat16", "job"),
        device=_opt(raw, "device", str, None, "job"),
        backend=_choice(raw, "backend", BACKENDS, "auto", "job"),
        micro_batch_tokens=_positive(raw, "micro_batch_tokens", 16384, "job"),
        checkpoint_every=_positive(raw, "checkpoint_every", 100, "job"),
        checkpoint_dir=_path(raw["checkpoint_dir"], base_dir) if raw.get("checkpoint_dir") else None,
        save_dtype=_choice(raw, "save_dtype", DTYPES, None, "job"),
        adam_betas=_betas(raw.get("adam_betas", (0.9, 0.999))),
        adam_eps=_number(raw, "adam_eps", 1e-8, "job", positive=True),
    )
    return job


def _adapter(raw: Any, i: int, base_dir: str) -> AdapterJob:
    where = f"adapters[{i}]"
    if not isinstance(raw, Mapping):
        raise JobError(f"{where} must be an object")
    _no_unknown(raw, AdapterJob, where)
    name = _req(raw, "name", str, where)
    try:
        check_name(name)  # the name the server will answer to
    except AdapterError as e:
        raise JobError(f"{where}.name: {e.reason}") from None
    where = f"adapter {name!r}"
    targets = raw.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        targets = tuple(targets)
    elif not (isinstance(targets, str) and targets):
        raise JobError(f"{where}: target_modules must be a non-empty list of names, a regex or 'all-linear'")
    if ("epochs" in raw) == ("steps" in raw):
        raise JobError(f"{where}: give exactly one of epochs and steps")
    max_norm = raw.get("max_grad_norm", 1.0)
    if max_norm is not None and (not _is_number(max_norm) or max_norm <= 0):
        raise JobError(f"{where}.max_grad_norm must be a positive number or null, got {max_norm!r}")
    adapter = AdapterJob(
        name=name,
        data=_path(_req(raw, "data", str, where), base_dir),
        rank=_positive(raw, "rank", None, where),
        alpha=_number(raw, "alpha", None, where, positive=True),
        target_modules=targets,
        lr=_number(raw, "lr", None, where, positive=True),
        batch_size=_positive(raw, "batch_size", None, where),
        epochs=_number(raw, "epochs", None, where, positive=True) if "epochs" in raw else None,
        steps=_positive(raw, "steps", None, where) if "steps" in raw else None,
        seed=_int(raw, "seed", 0, where),
        weight_decay=_number(raw, "weight_decay", 0.0, where),
        lr_scheduler=_choice(raw, "lr_scheduler", SCHEDULES, "linear", where),
        warmup_steps=_int(raw, "warmup_steps", 0, where),
        max_grad_norm=float(max_norm) if max_norm is not None else None,
        max_seq_len=_positive(raw, "max_seq_len", None, where) if raw.get("max_seq_len") is not None else None,
        shuffle=_opt(raw, "shuffle", bool, True, where),
    )
    if adapter.weight_decay < 0 or adapter.warmup_steps < 0:
        raise JobError(f"{where}: weight_decay and warmup_steps must be >= 0")
    return adapter


def _no_unknown(raw: Mapping, cls: type, where: str) -> None:
    unknown = sorted(set(raw) - {f.name for f in fields(cls)})
    if unknown:
        raise JobError(f"{where}: unknown field(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")


def _req(raw: Mapping, key: str, typ: type, where: str) -> Any:
    if raw.get(key) is None:
        raise JobError(f"{where}.{key} is required")
    return _opt(raw, key, typ, None, where)


def _opt(raw: Mapping, key: str, typ: type, default: Any, where: str) -> Any:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, typ) or (typ is not bool and isinstance(value, bool))):
        raise JobError(f"{where}.{key} must be a {typ.__name__}, got {value!r}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(raw: Mapping, key: str, default: float | None, where: str, positive: bool = False) -> float:
    if key not in raw and default is None:
        raise JobError(f"{where}.{key} is required")
    v = raw.get(key, default)
    if not _is_number(v) or (positive and v <= 0):
        raise JobError(f"{where}.{key} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def _int(raw: Mapping, key: str, default: int, where: str) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise JobError(f"{where}.{key} must be an integer, got {v!r}")
    return v


def _positive(raw: Mapping, key: str, default: int | None, where: str) -> int:
    if key not in raw and default is None:
        raise JobError(f"{where}.{key} is required")
    v = _int(raw, key, default, where)
    if v < 1:
        raise JobError(f"{where}.{key} must be >= 1, got {v}")
    return v


def _choice(raw: Mapping, key: str, choices: tuple[str, ...], default: str | None, where: str) -> str | None:
    v = raw.get(key, default)
    if v is not None and v not in choices:
        raise JobError(f"{where}.{key} must be one of {list(choices)}, got {v!r}")
    return v


def _betas(v: Any) -> tuple[float, float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)):
        raise JobError(f"job.adam_betas must be two numbers in [0, 1), got {v!r}")
    return float(v[0]), float(v[1])


def _path(p: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))
