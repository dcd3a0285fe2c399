"""Request traces for the throughput harness, generated the way S-LoRA's experiments do.

A trace is a list of requests: which adapter (popularity by a power law), when it arrives
(Gamma inter-arrival times, all at once, or closed loop), how long its prompt and output are,
and the rank of its adapter. Every system is benchmarked on the *same* trace file, so the trace
is generated once from a seeded spec, saved, and read back, never regenerated per system.

S-LoRA draws adapter `int(N * numpy.random.power(alpha))`: alpha = 1 is uniform, smaller alpha
concentrates requests on the low adapter ids. Arrivals are Gamma with shape 1/cv^2 and scale
cv^2/rate, so the mean rate is `rate` and the coefficient of variation of the gaps is `cv`
(cv = 1 is Poisson). Prompt token ids are not stored: `prompt_tokens` derives them from the seed
and the request index, which keeps trace files small and still reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

#: Arrival processes: Gamma-distributed gaps, everything at t=0 (the baseline's offline
#: `generate`), or closed loop (a fixed number of requests outstanding).
ARRIVALS = ("gamma", "all", "closed")


class WorkloadError(ValueError):
    """A workload spec or trace file is invalid; the message names the field."""


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace. Same spec + same seed = same trace."""

    n_adapters: int = 100
    num_requests: int = 1000
    alpha: float = 1.0
    arrival: str = "all"
    rate: float = 1.0
    cv: float = 1.0
    concurrency: int = 64
    input_len: tuple[int, int] = (256, 256)
    output_len: tuple[int, int] = (128, 128)
    ranks: tuple[int, ...] = (8, 16, 32, 64, 128)
    seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_adapters < 0:
            raise WorkloadError(f"n_adapters must be >= 0, got {self.n_adapters}")
        if self.num_requests < 1:
            raise WorkloadError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.alpha > 0:
            raise WorkloadError(f"alpha must be > 0 (1 = uniform popularity), got {self.alpha}")
        if self.arrival not in ARRIVALS:
            raise WorkloadError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.arrival == "gamma" and not (self.rate > 0 and self.cv > 0):
            raise WorkloadError(f"gamma arrivals need rate > 0 and cv > 0, got rate={self.rate} cv={self.cv}")
        if self.arrival == "closed" and self.concurrency < 1:
            raise WorkloadError(f"closed-loop concurrency must be >= 1, got {self.concurrency}")
        for key in ("input_len", "output_len"):
            lo, hi = getattr(self, key)
            if not 1 <= lo <= hi:
                raise WorkloadError(f"{key} must be a range 1 <= lo <= hi, got ({lo}, {hi})")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise WorkloadError(f"ranks must be positive integers, got {self.ranks}")

    @property
    def label(self) -> str:
        """A short human-readable name: the given one, or one built from the fields."""
        if self.name:
            return self.name
        how = {"all": "all-at-once", "closed": f"closed-{self.concurrency}",
               "gamma": f"gamma-rate{self.rate:g}-cv{self.cv:g}"}[self.arrival]
        return f"n{self.n_adapters}-{how}-{self.num_requests}req"

    def rank_of(self, adapter: int) -> int:
        """The baseline's rank mix: adapter j has rank ranks[j % len(ranks)]."""
        return self.ranks[adapter % len(self.ranks)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_len"], d["output_len"], d["ranks"] = (
            list(self.input_len), list(self.output_len), list(self.ranks))
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WorkloadSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise WorkloadError(f"unknown workload field(s) {unknown}; known: {sorted(known)}")
        kw = dict(raw)
        for key in ("input_len", "output_len"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        if "ranks" in kw:
            kw["ranks"] = tuple(int(v) for v in kw["ranks"])
        return cls(**kw)


@dataclass(frozen=True)
class Request:
    """One request of a trace. `adapter` is -1 for a trace without adapters (n_adapters = 0);
    `arrival_s` is None unless the spec's arrival process is timed."""

    index: int
    adapter: int
    rank: int
    input_len: int
    output_len: int
    arrival_s: float | None


@dataclass(frozen=True)
class Trace:
    spec: WorkloadSpec
    requests: tuple[Request, ...] = field(default_factory=tuple)

    @property
    def distinct_adapters(self) -> int:
        return len({r.adapter for r in self.requests if r.adapter >= 0})


def generate(spec: WorkloadSpec) -> Trace:
    """Draw a trace from `spec` with its own seeded generator (no global random state)."""
    # One independent stream per quantity, so traces that differ only in their adapters
    # (n_adapters, alpha: e.g. the base model's trace and a LoRA trace) have the same lengths
    # and arrival times.
    pick, in_rng, out_rng, gap_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(4))
    n = spec.num_requests
    if spec.n_adapters:
        adapters = np.minimum((spec.n_adapters * pick.power(spec.alpha, n)).astype(np.int64),
                              spec.n_adapters - 1)
    else:
        adapters = np.full(n, -1, dtype=np.int64)
    inputs = in_rng.integers(spec.input_len[0], spec.input_len[1] + 1, n)
    outputs = out_rng.integers(spec.output_len[0], spec.output_len[1] + 1, n)
    if spec.arrival == "gamma":
        gaps = gap_rng.gamma(1.0 / spec.cv**2, spec.cv**2 / spec.rate, n)
        arrivals: list[float | None] = [float(t) for t in np.cumsum(gaps)]
    else:
        arrivals = [None] * n
    requests = tuple(
        Request(index=i, adapter=int(a), rank=spec.rank_of(int(a)) if a >= 0 else 0,
                input_len=int(li), output_len=int(lo), arrival_s=t)
        for i, (a, li, lo, t) in enumerate(zip(adapters, inputs, outputs, arrivals)))
    return Trace(spec, requests)


def prompt_tokens(spec: WorkloadSpec, request: Request, vocab_size: int) -> list[int]:
    """The prompt token ids of a request: random, but a pure function of (seed, index), so a
    trace file need not store them. Ids 0-2 (special tokens in Llama vocabularies) are avoided."""
    if vocab_size < 4:
        raise WorkloadError(f"vocab_size must be >= 4, got {vocab_size}")
    rng = np.random.default_rng([spec.seed, request.index])
    return rng.integers(3, vocab_size, request.input_len).tolist()


def save_trace(trace: Trace, path: str) -> str:
    """JSON lines: the spec on the first line, then one request per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"spec": trace.spec.to_dict()}) + "\n")
        for r in trace.requests:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    return path


def load_trace(path: str) -> Trace:
    """Read a file written by `save_trace`; checks that it is complete and consistent."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError as e:
        raise WorkloadError(f"trace {path}: cannot read ({e.strerror})") from None
    try:
        spec = WorkloadSpec.from_dict(json.loads(lines[0])["spec"])
        requests = tuple(Request(**json.loads(ln)) for ln in lines[1:])
    except (IndexError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise WorkloadError(f"trace {path}: not a trace file written by save_trace ({e})") from None
    if len(requests) != spec.num_requests:
        raise WorkloadError(
            f"trace {path}: spec says {spec.num_requests} requests, file has {len(requests)}")
    if [r.index for r in requests] != list(range(len(requests))):
        raise WorkloadError(f"trace {path}: request indices are not 0..{len(requests) - 1} in order")
    bad = [r.index for r in requests if r.adapter >= spec.n_adapters]
    if bad:
        raise WorkloadError(f"trace {path}: request(s) {bad[:5]} name an adapter >= n_adapters={spec.n_adapters}")
    return Trace(spec, requests)


_FIELD_ALIASES = {"n": "n_adapters", "requests": "num_requests", "in": "input_len",
                  "out": "output_len"}


def parse_spec(text: str, defaults: WorkloadSpec | None = None) -> WorkloadSpec:
    """Parse a compact spec such as "n=1000,arrival=gamma,rate=4,cv=1,requests=300,in=8-512".

    Ranges are `lo-hi` or one number (fixed); ranks are separated by '/' (`ranks=8/16/32`).
    Fields not given keep `defaults` (the dataclass defaults if None).
    """
    base = (defaults or WorkloadSpec()).to_dict()
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise WorkloadError(f"workload spec {text!r}: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        key = _FIELD_ALIASES.get(key, key)
        if key not in base:
            raise WorkloadError(f"workload spec {text!r}: unknown field {key!r}; known: "
                                f"{sorted(set(base) | set(_FIELD_ALIASES))}")
        try:
            base[key] = _parse_value(key, value)
        except ValueError:
            raise WorkloadError(f"workload spec {text!r}: bad value {value!r} for {key}") from None
    return WorkloadSpec.from_dict(base)


def _parse_value(key: str, value: str) -> Any:
    if key in ("input_len", "output_len"):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", value)
        if not m:
            raise ValueError(value)
        return [int(m.group(1)), int(m.group(2) or m.group(1))]
    if key == "ranks":
        return [int(v) for v in value.split("/")]
    if key in ("n_adapters", "num_requests", "concurrency", "seed"):
        return int(value)
    if key in ("alpha", "rate", "cv"):
        return float(value)
    return value


def adapter_counts(requests: Iterable[Request], n_adapters: int) -> np.ndarray:
    """How many requests each adapter got (for skew checks and reports)."""
    counts = np.zeros(max(n_adapters, 1), dtype=np.int64)
    for r in requests:
        if r.adapter >= 0:
            counts[r.adapter] += 1
    return counts


def gap_stats(arrivals: Sequence[float]) -> tuple[float, float]:
    """(mean rate, coefficient of variation of the gaps) of a timed trace, to check a spec."""
    gaps = np.diff(np.concatenate([[0.0], np.asarray(arrivals, dtype=float)]))
    return float(1.0 / gaps.mean()), float(gaps.std() / gaps.mean())
