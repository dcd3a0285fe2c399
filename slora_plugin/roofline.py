"""The bytes roofline of a serving run: what every engine step must move, and how fast it could.

A decode step of a transformer is bound by memory traffic, not arithmetic: every step reads the
base model's weights once, the KV cache of every running sequence, and the weights of every
*distinct* adapter in the batch once. A prefill step is bound by arithmetic. So the least time a
step can take on a GPU is

    T_step = max(base_bytes / BW, flops / PEAK) / eta + adapter_bytes / BW

where BW is the GPU's measured device-to-device copy bandwidth (the H100 of `kernels/NOTES.md`:
3005 GB/s, counting read + write), PEAK its dense fp16 tensor throughput, and `eta` the base
model's own measured step efficiency (below). Summed over the steps of a recorded run, with each
step's real batch (which sequences, their KV lengths, their adapters), this gives the run's
roofline. This module is pure arithmetic (no vLLM, no numpy) so that it can be unit-tested by
hand and recomputed on any machine from the files a run leaves.

What a step moves (`step_bytes`), with `d` = `ModelDims` and `s` = the dtype size:
- base weights: every linear of every layer (`module_io` of the seven Llama modules), lm_head
  (vocab x hidden, read once whatever the batch), two RMS norms per layer and the final one;
  of the embedding only the rows of the step's tokens;
- KV: each decoding sequence reads its context (`ctx` tokens) and writes one token; a prefill
  writes its prompt; one token of KV is `2 x layers x num_key_value_heads x head_dim x s` (GQA);
- adapters: every distinct adapter of the step once, `layers x sum over its modules of
  r x (in + out) x s` at its real rank (the plugin), or padded to `max_lora_rank` in every
  wrapped layer (stock vLLM's slots); the caller says which (`AdapterCost`).

FLOPs (`step_flops`): 2 per weight per token for the linears, lm_head only for the tokens that
sample (one per sequence), attention 4 x layers x heads x head_dim per (query, key) pair (QK^T
and PV; a prompt of L tokens has L(L+1)/2 causal pairs), LoRA 2 per adapter weight per token.

Base efficiency (`eta`). vLLM does not run the base model at copy bandwidth either (kernel
launch gaps, attention and GEMM efficiency, host work between steps). The plugin cannot be
asked to beat that, so the roofline charges the base model's part of a step at the base model's
measured efficiency on the same workload: `eta = sum over the base run's busy steps of
max(base_bytes / BW, flops / PEAK) / sum of their measured times` (one number per base run,
`base_efficiency`), while the adapter bytes, the plugin's own addition, are charged at copy
bandwidth. A base row calibrated on itself is at 100% of its roofline by definition; its
`eta` says how far the base model is from the pure bytes bound. Without a base run, `eta` = 1.

Steps. A run records every engine step's end time (`step_s`); each finished request's first token
and finish time map it to the step that produced its first token (its prefill) and its last
token. A request with `n_out` tokens decodes in the last `n_out - 1` steps up to its finish
(exact when it was scheduled in every step; a request preempted, or left out of some steps by
the plugin's adapters-per-step cap, is taken to have paused right after its first token, and a
recompute is not charged), with context `input_len + 1, ..., input_len + n_out -
1`. Runs recorded before step times were kept are reconstructed (`reconstruct_steps`): the step
ends are the distinct first-token and finish times (vLLM stamps every first token of one step
with the same time), and between two of them the fewest evenly spaced steps that give every
request at least its own token count; `reconstruction_check` says how well the grid matches
each request's token count.

Idle time. A step's measured time runs from the previous step's end, or from the first arrival
after it when nothing was outstanding (a timed trace waiting for requests). The roofline run is
the measured run with every busy step at `T_step` and the idle time kept, so
`roofline_out_tok_per_s = output tokens / (duration - busy + sum T_step)`; `pct_of_roofline_busy`
compares the busy time alone, which is what matters for timed traces that keep up with arrivals:
their roofline run cannot end before every request, arriving when it did, could be served alone
(`arrival_bound`), so their `pct_of_roofline` is near 100% whenever the engine kept up.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from statistics import median
from typing import Callable, Mapping, Sequence

from slora_plugin.layout import ModelDims

#: Device-to-device copy bandwidth of the H100 80GB HBM3 (read + write, GB/s), measured by
#: benchmarks/bench_kernels.py (`kernels/NOTES.md`); pass the measured figure of another GPU.
H100_COPY_GBPS = 3005.0
#: Dense fp16 tensor-core peak of the H100 SXM (TFLOP/s, NVIDIA's datasheet; not measured).
H100_PEAK_TFLOPS = 989.0
#: Reconstruction: first-token and finish times closer than this are one step. The front end
#: stamps a step's first tokens when it starts processing the step's outputs and its finishes
#: after that, up to a few milliseconds later; a 7B model's decode steps are >= 5.9 ms apart
#: on the H100 (`step-profile-2026-11-23.json`).
SAME_STEP_S = 5e-3
#: Rounding slack when a stamp is mapped to its step (times are kept to the microsecond; a
#: step's stamps are tens of microseconds or more from the step's end).
STAMP_EPS_S = 1e-5


@dataclass(frozen=True)
class ModelBytes:
    """What the byte model needs of the base model: its dims, vocabulary and dtype size."""

    dims: ModelDims
    vocab_size: int
    dtype_bytes: int
    #: Bytes every step reads besides the model's weights: the resident shared bases of the
    #: compressed collections an engine serves (its op multiplies every step's tokens by them).
    shared_bytes: int = 0

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights every step reads whatever its batch: linears, lm_head, norms, shared bases."""
        d = self.dims
        params = (d.num_hidden_layers * (d.linear_params_per_layer + 2 * d.hidden_size)
                  + self.vocab_size * d.hidden_size + d.hidden_size)
        return params * self.dtype_bytes + self.shared_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.dims.kv_elems_per_token * self.dtype_bytes

    def adapter_elems(self, ranks: Mapping[str, int]) -> int:
        """Weights of an adapter at its real rank, all layers: sum of r x (in + out)."""
        per_layer = sum(r * sum(self.dims.module_io(m)) for m, r in ranks.items() if r)
        return self.dims.num_hidden_layers * per_layer


@dataclass(frozen=True)
class AdapterCost:
    """What one adapter costs a step that runs it: `bytes` read once per step, and `elems`
    weights multiplied per token (2 FLOPs each). Stock vLLM pads both to max_lora_rank."""

    bytes: int
    elems: int


@dataclass
class StepLoad:
    """The work of one engine step, aggregated over its sequences."""

    decode: int = 0               # sequences generating one token
    decode_ctx: int = 0           # sum of their context lengths (KV tokens read)
    prefill: int = 0              # sequences whose prompt is processed in this step
    prefill_tokens: int = 0
    prefill_pairs: int = 0        # sum of L(L+1)/2: causal attention pairs of the prompts
    lora_token_elems: int = 0     # sum over the step's tokens of its adapter's elems
    adapters: int = 0             # distinct adapters
    adapter_bytes: int = 0        # their bytes, each once

    @property
    def tokens(self) -> int:
        return self.decode + self.prefill_tokens

    @property
    def batch(self) -> int:
        return self.decode + self.prefill


def base_step_bytes(model: ModelBytes, load: StepLoad) -> int:
    """Bytes of the base model's part of a step: weights, embedding rows, KV read and written."""
    d = model.dims
    kv = load.decode_ctx + load.decode + load.prefill_tokens
    return (model.weight_bytes_per_step + load.tokens * d.hidden_size * model.dtype_bytes
            + kv * model.kv_bytes_per_token)


def step_bytes(model: ModelBytes, load: StepLoad) -> int:
    """Everything the step must move: the base part and every distinct adapter once."""
    return base_step_bytes(model, load) + load.adapter_bytes


def step_flops(model: ModelBytes, load: StepLoad) -> float:
    """Arithmetic of the step (see the module docstring)."""
    d = model.dims
    linear = 2 * d.num_hidden_layers * d.linear_params_per_layer * load.tokens
    lm_head = 2 * model.vocab_size * d.hidden_size * load.batch
    pairs = load.decode_ctx + load.decode + load.prefill_pairs
    attention = 4 * d.num_hidden_layers * d.num_attention_heads * d.head_dim * pairs
    return float(linear + lm_head + attention + 2 * load.lora_token_elems)


def step_time(model: ModelBytes, load: StepLoad, gbps: float, tflops: float,
              base_efficiency: float = 1.0) -> float:
    """Least time of the step: the base part bound by bytes or FLOPs at the base model's
    efficiency, plus the adapter bytes at copy bandwidth (module docstring)."""
    if not (gbps > 0 and tflops > 0 and 0 < base_efficiency):
        raise ValueError(f"bandwidth, peak and efficiency must be > 0, got {gbps}, {tflops}, {base_efficiency}")
    base = max(base_step_bytes(model, load) / (gbps * 1e9), step_flops(model, load) / (tflops * 1e12))
    return base / base_efficiency + adapter_time(load, gbps)


def adapter_time(load: StepLoad, gbps: float) -> float:
    """The step's adapter bytes at copy bandwidth: the adapters' part of `step_time`."""
    return load.adapter_bytes / (gbps * 1e9)


# ----------------------------------------------------------------------------- a run's steps

@dataclass(frozen=True)
class RequestSpan:
    """One finished request on the trace clock (seconds after the trace's start)."""

    adapter: int          # -1: no adapter
    input_len: int
    n_out: int
    arrival_s: float
    first_s: float        # its first token (end of its prefill step)
    finish_s: float       # its last token


def spans_from_records(records: Sequence[Mapping]) -> list[RequestSpan]:
    """The harness's per-request records (`bench.run.run_trace`) -> spans of the finished ones
    (an unfinished request of a cut trace has no first-token time and adds no output tokens)."""
    out = []
    for r in records:
        if not r.get("finished") or r.get("ttft_s") is None or not r.get("n_out"):
            continue
        a = float(r["arrival_s"])
        out.append(RequestSpan(int(r["adapter"]), int(r["input_len"]), int(r["n_out"]), a,
                               a + float(r["ttft_s"]), a + float(r["e2e_s"])))
    return out


def _clusters(times: Sequence[float]) -> dict[float, float]:
    """Each time -> the end of its cluster: sorted times within SAME_STEP_S of the previous one
    are one step, which ends at the latest of them (when its last output was stamped)."""
    groups: list[list[float]] = []
    for t in sorted(set(times)):
        if groups and t - groups[-1][-1] < SAME_STEP_S:
            groups[-1].append(t)
        else:
            groups.append([t])
    return {t: g[-1] for g in groups for t in g}


def reconstruct_steps(spans: Sequence[RequestSpan]) -> tuple[list[float], list[RequestSpan]]:
    """Step end times of a run recorded without them (module docstring), and the spans with
    their first-token and finish times moved to the end of the step they were stamped in (so
    that `run_steps` maps them to it).

    The known step ends are the distinct first-token and finish times (`_clusters`). A request
    with n_out tokens spans at least n_out - 1 steps between its first-token step and its finish
    step (exactly that many when it was scheduled in every step in between), and every known end
    is one step; the fewest steps that satisfy all of these is a longest path over the known ends
    in time order: N[g] = max(N[g-1] + 1, N[first step of r] + n_out(r) - 1 for each r finishing
    at g). The N[g] - N[g-1] steps of each gap are spread evenly over it."""
    end = _clusters([s.first_s for s in spans] + [s.finish_s for s in spans])
    spans = [replace(s, first_s=end[s.first_s], finish_s=end[s.finish_s]) for s in spans]
    known = sorted(set(end.values()))
    if not known:
        return [], spans
    ending: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        a, b = _first_step(known, s.first_s), _last_step(known, s.finish_s)
        if b > a:
            ending.setdefault(b, []).append((a, s.n_out - 1))
    count = [0] * len(known)
    for g in range(1, len(known)):
        count[g] = max([count[g - 1] + 1] + [count[a] + m for a, m in ending.get(g, ())])
    steps = [known[0]]
    for g in range(1, len(known)):
        k, prev, t = count[g] - count[g - 1], known[g - 1], known[g]
        steps += [prev + (t - prev) * j / k for j in range(1, k + 1)]
    return steps, spans


def reconstruction_check(spans: Sequence[RequestSpan], step_s: Sequence[float]) -> float | None:
    """Median over requests of (steps between first and last token) / (n_out - 1): 1.0 when
    the step grid matches every request's token count (exact for recorded steps without
    preemption)."""
    ratios = []
    for s in spans:
        if s.n_out > 1:
            k0, k1 = _first_step(step_s, s.first_s), _last_step(step_s, s.finish_s)
            ratios.append((k1 - k0) / (s.n_out - 1))
    return median(ratios) if ratios else None


def _first_step(step_s: Sequence[float], t: float) -> int:
    """The step that produced a first token stamped at `t`: the front end stamps first tokens
    before the harness stamps the step's end, so the first step ending at or after `t`."""
    return min(bisect_left(step_s, t - STAMP_EPS_S), len(step_s) - 1)


def _last_step(step_s: Sequence[float], t: float) -> int:
    """The step that finished a request at `t`: the harness stamps a finish just after the
    step's end, so the last step ending at or before `t`."""
    return max(bisect_right(step_s, t + STAMP_EPS_S) - 1, 0)


@dataclass(frozen=True)
class RunSteps:
    """A run cut into steps: each step's load and measured time."""

    loads: list[StepLoad]
    measured_s: list[float]


def run_steps(spans: Sequence[RequestSpan], step_s: Sequence[float],
              cost: Callable[[int], AdapterCost | None]) -> RunSteps:
    """Each step's sequences, KV lengths and distinct adapters (module docstring, "Steps");
    `cost(adapter)` prices an adapter id (None: no adapter, as for id -1)."""
    n = len(step_s)
    if not n:
        return RunSteps([], [])
    loads = [StepLoad() for _ in range(n)]
    # difference arrays: decode count, context sum = c0 + c1 * k, LoRA elems per token
    d_count, d_c0, d_c1, d_lora = ([0] * (n + 1) for _ in range(4))
    active: dict[int, list[tuple[int, int]]] = {}
    for s in spans:
        k0, k1 = _first_step(step_s, s.first_s), _last_step(step_s, s.finish_s)
        k1 = max(k0, k1)
        c = cost(s.adapter) if s.adapter >= 0 else None
        ld = loads[k0]
        ld.prefill += 1
        ld.prefill_tokens += s.input_len
        ld.prefill_pairs += s.input_len * (s.input_len + 1) // 2
        ranges = [(k0, k0)]
        if s.n_out > 1:
            start = max(k0 + 1, k1 - s.n_out + 2)
            if start <= k1:
                # context at step k: input_len + n_out - 1 - (k1 - k)
                d_count[start] += 1
                d_count[k1 + 1] -= 1
                c0 = s.input_len + s.n_out - 1 - k1
                d_c0[start] += c0
                d_c0[k1 + 1] -= c0
                d_c1[start] += 1
                d_c1[k1 + 1] -= 1
                ranges.append((start, k1))
                if c is not None:
                    d_lora[start] += c.elems
                    d_lora[k1 + 1] -= c.elems
        if c is not None:
            ld.lora_token_elems += c.elems * s.input_len
            active.setdefault(s.adapter, []).extend(ranges)
    d_adapters, d_bytes = [0] * (n + 1), [0] * (n + 1)
    for adapter, ranges in active.items():
        b = cost(adapter).bytes
        for lo, hi in _merge(ranges):
            d_adapters[lo] += 1
            d_adapters[hi + 1] -= 1
            d_bytes[lo] += b
            d_bytes[hi + 1] -= b
    count = c0 = c1 = lora = adapters = abytes = 0
    for k, ld in enumerate(loads):
        count += d_count[k]
        c0 += d_c0[k]
        c1 += d_c1[k]
        lora += d_lora[k]
        adapters += d_adapters[k]
        abytes += d_bytes[k]
        ld.decode = count
        ld.decode_ctx = c0 + c1 * k
        ld.lora_token_elems += lora
        ld.adapters = adapters
        ld.adapter_bytes = abytes
    return RunSteps(loads, measured_step_times(spans, step_s))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def measured_step_times(spans: Sequence[RequestSpan], step_s: Sequence[float]) -> list[float]:
    """Each step's busy time: from the previous step's end, or from the first arrival after it
    when no request was outstanding then (module docstring, "Idle time")."""
    arrivals = sorted(s.arrival_s for s in spans)
    finish_steps = sorted(_last_step(step_s, s.finish_s) for s in spans)
    out = []
    prev = 0.0
    for k, end in enumerate(step_s):
        arrived = bisect_right(arrivals, prev)
        done = bisect_right(finish_steps, k - 1)
        start = prev
        if arrived <= done:      # nothing outstanding at prev: the engine waited for an arrival
            nxt = arrivals[arrived] if arrived < len(arrivals) else prev
            start = min(max(prev, nxt), end)
        out.append(end - start)
        prev = end
    return out


@dataclass(frozen=True)
class StepKind:
    """The busy time of one kind of step against its least time: "prefill" (a step that
    processes some request's prompt: where requests are admitted, their adapters loaded and
    their prompts run) or "decode" (every sequence generates one token)."""

    steps: int
    busy_s: float
    ideal_s: float
    adapter_ideal_s: float    # the part of ideal_s that is adapter bytes at copy bandwidth

    @property
    def pct_of_roofline(self) -> float:
        """Ideal over measured busy time, in percent."""
        return 100.0 * self.ideal_s / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(frozen=True)
class Roofline:
    """A run's roofline (module docstring) and its per-step statistics."""

    steps: int
    busy_s: float
    ideal_busy_s: float
    duration_s: float
    out_tokens: int
    arrival_bound_s: float
    distinct_adapters_per_step_mean: float
    adapter_bytes_per_step_mean: float
    batch_size_per_step_mean: float
    kv_tokens_per_step_mean: float
    #: "prefill" and "decode" steps apart (`StepKind`): which kind holds the gap.
    by_kind: Mapping[str, StepKind]

    @property
    def roofline_duration_s(self) -> float:
        """The run with every busy step at its least time and the idle time kept; never shorter
        than `arrival_bound_s` (a timed trace cannot finish before its arrivals are served)."""
        return max(max(self.duration_s - self.busy_s, 0.0) + self.ideal_busy_s, self.arrival_bound_s)

    @property
    def roofline_out_tok_per_s(self) -> float:
        return self.out_tokens / self.roofline_duration_s if self.roofline_duration_s > 0 else 0.0

    @property
    def pct_of_roofline(self) -> float:
        """Measured throughput over the roofline's, in percent."""
        return 100.0 * self.roofline_duration_s / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def pct_of_roofline_busy(self) -> float:
        """Ideal over measured busy time, in percent (the efficiency of the steps alone)."""
        return 100.0 * self.ideal_busy_s / self.busy_s if self.busy_s > 0 else 0.0


def run_roofline(model: ModelBytes, steps: RunSteps, duration_s: float, out_tokens: int,
                 gbps: float = H100_COPY_GBPS, tflops: float = H100_PEAK_TFLOPS,
                 base_efficiency: float = 1.0, arrival_bound_s: float = 0.0) -> Roofline:
    """Sum the steps' least times (see `step_time`) against their measured times."""
    n = len(steps.loads)
    ideals = [step_time(model, ld, gbps, tflops, base_efficiency) for ld in steps.loads]
    mean = (lambda f: sum(f(ld) for ld in steps.loads) / n) if n else (lambda f: 0.0)  # noqa: E731
    kinds: dict[str, list[float]] = {}  # kind -> [steps, busy, ideal, adapter ideal]
    for ld, measured, ideal in zip(steps.loads, steps.measured_s, ideals):
        k = kinds.setdefault("prefill" if ld.prefill else "decode", [0, 0.0, 0.0, 0.0])
        k[0] += 1
        k[1] += measured
        k[2] += ideal
        k[3] += adapter_time(ld, gbps)
    return Roofline(
        steps=n, busy_s=sum(steps.measured_s), ideal_busy_s=sum(ideals), duration_s=duration_s,
        out_tokens=out_tokens, arrival_bound_s=arrival_bound_s,
        distinct_adapters_per_step_mean=mean(lambda ld: ld.adapters),
        adapter_bytes_per_step_mean=mean(lambda ld: ld.adapter_bytes),
        batch_size_per_step_mean=mean(lambda ld: ld.batch),
        kv_tokens_per_step_mean=mean(lambda ld: ld.decode_ctx),
        by_kind={kind: StepKind(int(v[0]), v[1], v[2], v[3]) for kind, v in sorted(kinds.items())})


def arrival_bound(model: ModelBytes, spans: Sequence[RequestSpan],
                  cost: Callable[[int], AdapterCost | None], gbps: float = H100_COPY_GBPS,
                  tflops: float = H100_PEAK_TFLOPS, base_efficiency: float = 1.0) -> float:
    """The earliest a run can end given its arrivals: no request finishes before its arrival plus
    its prefill and n_out - 1 decode steps of a batch of one (its context at mid-generation, its
    adapter read every step). 0 for traces that arrive all at once with short requests."""
    bound = 0.0
    for s in spans:
        c = cost(s.adapter) if s.adapter >= 0 else None
        ab, ae = (c.bytes, c.elems) if c else (0, 0)
        prefill = StepLoad(prefill=1, prefill_tokens=s.input_len,
                           prefill_pairs=s.input_len * (s.input_len + 1) // 2,
                           lora_token_elems=ae * s.input_len, adapters=int(c is not None), adapter_bytes=ab)
        decode = StepLoad(decode=1, decode_ctx=s.input_len + s.n_out // 2, lora_token_elems=ae,
                          adapters=int(c is not None), adapter_bytes=ab)
        t = (step_time(model, prefill, gbps, tflops, base_efficiency)
             + (s.n_out - 1) * step_time(model, decode, gbps, tflops, base_efficiency))
        bound = max(bound, s.arrival_s + t)
    return bound


def base_efficiency(model: ModelBytes, base_steps: RunSteps, gbps: float = H100_COPY_GBPS,
                    tflops: float = H100_PEAK_TFLOPS) -> float:
    """`eta` of a base-model run: its steps' pure roofline time over their measured time."""
    busy = sum(base_steps.measured_s)
    if busy <= 0:
        raise ValueError("the base run has no busy time to calibrate on")
    ideal = sum(step_time(model, ld, gbps, tflops) for ld in base_steps.loads)
    return ideal / busy
