"""GPU runner of the throughput harness: one system, one engine, several traces.

Engine start-up costs 1-2 minutes, so one process serves every trace of a command with one
`LLM`: the base model (no LoRA), stock vLLM multi-LoRA, or the plugin (stock vLLM plus
`additional_config={"slora": {...}}`; the runner only passes the config). Only public vLLM API
is used (`LLM`, `LLM.enqueue`, `LLM.get_metrics`,
`LLM.llm_engine.step/abort_request/list_loras/remove_lora`, `RequestOutput.metrics`,
`VLLM_LOGGING_CONFIG_PATH`), so nothing here belongs in `patches/`. The engine core is spawned
(ENGINE_ENV) after the adapters are written, for every system.

Timing. Requests are enqueued when their arrival time comes (all at t=0, closed loop, or Gamma
arrivals) and the engine is stepped in this loop. `disable_log_stats=False` makes vLLM attach
`RequestOutput.metrics`: the first token's wall time is `metrics.arrival_time +
metrics.first_token_latency`, TPOT comes from the engine core's first/last token timestamps.
TTFT and end-to-end latency are measured from the *scheduled* arrival, so they include the
time a due request waited while this loop was blocked in `step()` (at most one engine step;
`client_lag_max_s` in the row says how much).

Cold traces. Each trace uses its own adapter names and LoRA ids (adapter j of trace k is entry
`offset_k + j` of the adapter directory), so no trace finds adapters cached by an earlier one,
as in a fresh process; stock's host cache is emptied after each trace (`remove_lora`). Adapter
directories are hard links to a few distinct random files per rank, so thousands fit in
/dev/shm.

Memory. The KV cache size is what vLLM allocated (`num_gpu_blocks * block_size` tokens, read
from the engine's config). `gpu_mem_used_peak_mib` polls `nvidia-smi` for the whole device: vLLM
reserves its KV cache up front, so this shows the reservation (about gpu_memory_utilization of
the GPU), not the working set; torch's peak counters live in the engine-core process and are
not visible here.

Counters (`bench.pool_log`). Every row has `preemptions` (vLLM's counter, over the trace); plugin
rows have `adapter_loads`, `adapter_evictions`, `pages_total`, `adapter_pages_peak`,
`adapters_resident_peak`, and the worker's host loads by whether the step had to wait for the
disk: `host_load_hits`, `host_load_waits`, `host_load_wait_s` (seconds the steps waited), from
the page pool's log (None for stock and base, or when no pool line came; the host counts also
when the worker runs in another process than the scheduler, TP > 1).

Output: `<out_dir>/throughput-<system>-<UTC stamp>.json` (see `bench.report`), rewritten after
every trace so a cut command keeps what it finished, `...-requests.jsonl.gz` with every
request's arrival, TTFT, end-to-end latency and TPOT, `...-steps.jsonl.gz` with every engine
step's end time (each row's roofline keys are computed from these two and the model config,
which the results file keeps: `bench.roofline_rows`), and for the plugin `...-pool.log` (the pool's
log lines). The logging config that makes the engine core write that log is an internal
file: it lives in a temporary directory for the duration of `run` only.

Profile window (`RunOptions.profile`, `--profile INDEX:START_S:DURATION_S`). The engine gets
vLLM's torch profiler (`profiler_config`, no stacks); trace INDEX calls `LLM.start_profile()`
when its clock passes START_S and `LLM.stop_profile()` DURATION_S later or when it ends.
The engine core (its in-process worker, TP=1) profiles and writes the Chrome trace and
`profiler_out_0.txt` into `<work_dir>/profile-<stamp>/`, kept there (tens of MB: not copied into
the results); the row gets `profiled: true` and `profile` (the window actually profiled on the
trace's clock, the trace file, and `bench.profile.summarize_gpu_trace`'s summary), and the table,
cut to 200 lines, goes next to the results as `...-profile.txt`. A profiled row's throughput is
NOT a measurement: the profiler slows every step in the window, and stop_profile blocks the
engine while the trace is exported; the report marks the row and keeps it out of its plots.
Rows after it in the same command carry a small leftover (the worker annotates every step once a
profiler exists), so profile in a command of its own.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm import tqdm

from slora_plugin.bench.compressed_fleet import CompressedFleet, prepare_compressed
from slora_plugin.bench.pool_log import POOL_KEYS, PoolLog, pool_fields, pool_log_env, preemption_count
from slora_plugin.bench.profile import (
    ProfileError, ProfileWindow, copy_table, describe, summarize_gpu_trace, wait_for_trace)
from slora_plugin.bench.report import summarize, write_results
from slora_plugin.bench.roofline_rows import STEPS_SUFFIX, calibration_for, roofline_fields, write_steps
from slora_plugin.bench.workload import Trace, prompt_tokens
from slora_plugin.model_config import ModelMemory, load_model_config, write_model_config
from slora_plugin.roofline import H100_COPY_GBPS, H100_PEAK_TFLOPS

SYSTEMS = ("base", "stock", "plugin")
WARMUP_REQUESTS = 8
#: Name prefix of the engine core's profiler trace (vLLM appends the worker's rank suffix).
PROFILE_PREFIX = "slora-bench"


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


@dataclass
class RunOptions:
    """One command's worth of work: one system over `traces`."""

    system: str
    traces: list[Trace]
    model: str = "llama-2-7b"
    work_dir: str = "/dev/shm/slora-bench"
    out_dir: str = "benchmarks/results"
    adapter_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    distinct: int = 2
    max_loras: int = 128
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    lora_target_modules: tuple[str, ...] | None = ("qkv_proj", "o_proj")
    slora_config: dict[str, Any] = field(default_factory=dict)
    engine_args: dict[str, Any] = field(default_factory=dict)
    slo_ttft_s: float = 6.0
    deadline_s: float = 480.0
    command: str = ""
    profile: ProfileWindow | None = None
    #: The GPU's measured copy bandwidth and fp16 peak, for the rows' roofline (bench.roofline_rows).
    copy_gbps: float = H100_COPY_GBPS
    peak_tflops: float = H100_PEAK_TFLOPS
    #: Plugin only: serve the adapters from one compressed collection of this rank K
    #: (`bench.compressed_fleet`); None serves them as plain adapters.
    compress_rank: int | None = None
    compress_clusters: int = 1

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise BenchError(f"system must be one of {SYSTEMS}, got {self.system!r}")
        if not self.traces:
            raise BenchError("no traces to run")
        if self.distinct < 1:
            raise BenchError(f"distinct must be >= 1, got {self.distinct}")
        if self.compress_rank is not None and (self.system != "plugin" or self.compress_rank < 1
                                               or self.compress_clusters < 1):
            raise BenchError(f"--compress-rank needs --system plugin and K, clusters >= 1, got system "
                             f"{self.system!r}, K {self.compress_rank}, clusters {self.compress_clusters}")
        if self.profile is not None and self.profile.trace_index >= len(self.traces):
            raise BenchError(f"--profile: trace index {self.profile.trace_index}, but this command "
                             f"runs {len(self.traces)} trace(s) (0..{len(self.traces) - 1})")


# ----------------------------------------------------------------------------- adapters

def adapter_name(global_id: int) -> str:
    return f"adapter-{global_id:05d}"


def trace_offsets(traces: Sequence[Trace]) -> list[int]:
    """First global adapter id of each trace; ids 0..WARMUP_REQUESTS-1 are the warm-up's."""
    offsets, nxt = [], WARMUP_REQUESTS
    for t in traces:
        offsets.append(nxt)
        nxt += t.spec.n_adapters
    return offsets


def adapter_plan(traces: Sequence[Trace]) -> dict[int, tuple[int, int]]:
    """global id -> (rank, variant): every adapter entry the command needs."""
    ranks0 = traces[0].spec
    plan = {g: (ranks0.rank_of(g), g // len(ranks0.ranks)) for g in range(WARMUP_REQUESTS)}
    for t, off in zip(traces, trace_offsets(traces)):
        for j in range(t.spec.n_adapters):
            plan[off + j] = (t.spec.rank_of(j), j // len(t.spec.ranks))
    return plan


def fleet_of(plan: dict[int, tuple[int, int]], distinct: int) -> list[Any]:
    """The `FleetAdapter` of every global id of `plan`: variant v of rank r is group
    `r<r>-v<v % distinct>`, its weights seeded 1000 * r + v % distinct."""
    from slora_plugin.adapters.fleet import FleetAdapter

    return [FleetAdapter(adapter_name(g), rank, seed=1000 * rank + v % distinct,
                         group=f"r{rank}-v{v % distinct}") for g, (rank, v) in plan.items()]


def prepare_adapters(root: str, plan: dict[int, tuple[int, int]], model_cfg: dict[str, Any],
                     modules: Sequence[str], distinct: int) -> str:
    """Write `distinct` random PEFT adapters per rank under root/variants (`fleet_of`) and one
    directory per global id under root/adapters, made of hard links to its variant. Reuses
    what exists (checking the rank); returns the adapter directory."""
    from slora_plugin.adapters.fleet import FleetError, write_fleet

    dims = ModelMemory.from_config(model_cfg).dims
    adir, vdir = os.path.join(root, "adapters"), os.path.join(root, "variants")
    fleet = fleet_of(plan, distinct)
    t0 = time.time()
    try:
        write_fleet(adir, fleet, dims, modules, files_dir=vdir, progress=True)
    except FleetError as e:
        raise BenchError(f"{e}: remove {root} (left by a run with another rank mix)") from None
    print(f"[bench] {len(plan)} adapters in {adir} from {len({a.group for a in fleet})} files "
          f"({time.time() - t0:.1f} s)", flush=True)
    return adir


# ----------------------------------------------------------------------------- device

def _nvidia_smi(query: str) -> list[str]:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                              "-i", gpu], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [s.strip() for s in out.stdout.strip().split(",")]


def device_description() -> str:
    f = _nvidia_smi("name,memory.total,driver_version")
    return f"{f[0]} ({f[1]} MiB, driver {f[2]})" if len(f) == 3 else "unknown (nvidia-smi unavailable)"


class GpuMemoryPoller:
    """Peak `memory.used` of the device (all processes) while the context is open."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            f = _nvidia_smi("memory.used")
            if f and f[0].isdigit():
                self.peak_mib = max(self.peak_mib or 0, int(f[0]))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuMemoryPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- engine

def check_plugin_installed() -> None:
    """vLLM loads the plugin through its entry point, in every process; a copy that is only
    importable from sys.path would be ignored and the 'plugin' run would fail or be stock."""
    import importlib.metadata

    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    if not any(ep.value.startswith("slora_plugin") for ep in eps):
        raise BenchError("the slora plugin is not installed as a vllm.general_plugins entry point: "
                         "install the package (e.g. `bash benchmarks/gpu_run.sh install`)")


def engine_kwargs(opts: RunOptions, model_dir: str, adapter_dir: str | None,
                  profile_dir: str | None = None) -> dict[str, Any]:
    """`LLM(...)` arguments: the baseline's offline setup plus the system's LoRA settings, and
    vLLM's torch profiler writing into `profile_dir` when given (no stacks: smaller, cheaper)."""
    kw: dict[str, Any] = dict(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="float16",
        max_model_len=1024, gpu_memory_utilization=0.9, seed=0, disable_log_stats=False)
    max_rank = opts.max_lora_rank or max(max(t.spec.ranks) for t in opts.traces)
    if opts.system == "stock":
        largest = max(t.spec.n_adapters for t in opts.traces)
        kw.update(enable_lora=True, max_loras=opts.max_loras, max_lora_rank=max_rank,
                  max_cpu_loras=opts.max_cpu_loras or max(opts.max_loras, largest),
                  lora_target_modules=list(opts.lora_target_modules) if opts.lora_target_modules else None)
    elif opts.system == "plugin":
        kw["additional_config"] = {"slora": {"adapter_dir": adapter_dir, "max_lora_rank": max_rank,
                                             **opts.slora_config}}
    if profile_dir is not None:
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": os.path.abspath(profile_dir),
                                 "torch_profiler_with_stack": False}
    kw.update(opts.engine_args)
    return kw


def _settings(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules",
            "additional_config")
    s = {k: kw[k] for k in keys if k in kw}
    s.update({k: v for k, v in kw.items() if k not in s and k not in (
        "model", "load_format", "skip_tokenizer_init", "dtype", "max_model_len",
        "gpu_memory_utilization", "seed", "disable_log_stats", "profiler_config")})
    return s


@dataclass(frozen=True)
class ServedAdapters:
    """Where the engine finds the run's adapters and what a request names: the plain adapter
    directories, or (`RunOptions.compress_rank`) the members of one compressed collection."""

    adapter_dir: str
    compressed: CompressedFleet | None = None

    def lora(self, global_id: int) -> Any:
        from vllm.lora.request import LoRARequest

        name = adapter_name(global_id)
        if self.compressed is None:
            return LoRARequest(name, global_id + 1, os.path.join(self.adapter_dir, name))
        return LoRARequest(self.compressed.request_name(name), global_id + 1, self.compressed.request_path(name))


def _lora(opts: RunOptions, adapters: ServedAdapters | None, global_id: int) -> Any:
    return None if opts.system == "base" or adapters is None else adapters.lora(global_id)


def run_trace(llm: Any, opts: RunOptions, trace: Trace, offset: int, adapters: ServedAdapters | None,
              vocab_size: int, deadline: float, profile: ProfileWindow | None = None,
              ) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Serve one trace; returns (row metrics, per-request records, whether the deadline cut it).

    A record has the request's `arrival_s` (scheduled, after the trace's start), `ttft_s`,
    `e2e_s` (both from that arrival), `tpot_s`, `n_out` and `finished`. The row's `step_s` is
    when each `step()` call (one engine step) returned, on the trace's clock, for the roofline
    (`bench.roofline_rows`); the caller takes it out of the row. With `profile`, the
    engine is profiled over that window of the trace's clock (see the module docstring): the
    row gets `profiled` and `profile` (`start_s`, `stop_s`: when start/stop_profile were called;
    `stop_call_s`: how long stop_profile blocked), or `profile.error` when the trace ended
    before the window began."""
    from vllm import SamplingParams

    spec, reqs = trace.spec, trace.requests
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": prompt_tokens(spec, r, vocab_size)} for r in reqs]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0,
                             detokenize=False) for r in reqs]
    loras = [_lora(opts, adapters, offset + r.adapter) if r.adapter >= 0 else None for r in reqs]
    records = [{"index": r.index, "adapter": r.adapter, "input_len": r.input_len, "n_out": 0,
                "finished": False, "arrival_s": None, "ttft_s": None, "e2e_s": None, "tpot_s": None}
               for r in reqs]
    arrival = [0.0] * len(reqs)      # scheduled arrival, seconds after t0
    by_id: dict[str, int] = {}       # vLLM's external request id -> index
    internal: dict[int, str] = {}    # index -> internal id (for abort)
    lag, last_finish = 0.0, 0.0
    nxt, inflight, cut = 0, 0, False
    # Without a terminal (the GPU machine's captured log) a bar line every 10 s, not 10 per second.
    bar = tqdm(total=len(reqs), desc=f"{opts.system} {spec.label}", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    window = _ProfileClock(llm, profile)
    step_s: list[float] = []
    t0 = time.time()
    while True:
        now = time.time() - t0
        window.tick(now, t0)
        if time.time() > deadline:
            unfinished = [internal[i] for i in internal if not records[i]["finished"]]
            if unfinished:
                engine.abort_request(unfinished, internal=True)
            cut = nxt < len(reqs) or bool(unfinished)
            break
        due: list[int] = []
        if spec.arrival == "all":
            due = list(range(nxt, len(reqs)))
        elif spec.arrival == "gamma":
            while nxt + len(due) < len(reqs) and reqs[nxt + len(due)].arrival_s <= now:
                due.append(nxt + len(due))
        else:  # closed loop: keep `concurrency` requests outstanding
            due = list(range(nxt, min(len(reqs), nxt + spec.concurrency - inflight)))
        if due:
            ids = llm.enqueue([prompts[i] for i in due], [params[i] for i in due],
                              lora_request=[loras[i] for i in due], use_tqdm=False)
            for i, rid in zip(due, ids):
                internal[i] = rid
                by_id[rid.split("-")[0]] = i
                arrival[i] = reqs[i].arrival_s if spec.arrival == "gamma" else now
                records[i]["arrival_s"] = round(arrival[i], 6)
                lag = max(lag, now - arrival[i])
            nxt += len(due)
            inflight += len(due)
        if engine.has_unfinished_requests():
            outs = engine.step()
            step_s.append(time.time() - t0)
            for out in outs:
                if out.finished:
                    i = by_id[out.request_id]
                    last_finish = time.time()
                    _record(records[i], out, t0 + arrival[i], last_finish)
                    inflight -= 1
                    bar.update(1)
        elif nxt >= len(reqs):
            break
        else:
            time.sleep(max(0.0, min(0.05, reqs[nxt].arrival_s - (time.time() - t0))))
    bar.close()
    end = last_finish if last_finish else time.time()
    window.finish(t0)
    row = summarize(records, max(end - t0, 1e-9), opts.slo_ttft_s)
    row["client_lag_max_s"] = round(lag, 4)
    row["distinct_adapters"] = 0 if opts.system == "base" else trace.distinct_adapters
    row["step_s"] = step_s
    if profile is not None:
        row.update(window.fields())
    return row, records, cut


class _ProfileClock:
    """Starts and stops the engine's profiler on the trace's clock (a no-op without a window)."""

    def __init__(self, llm: Any, window: ProfileWindow | None):
        self.llm, self.window = llm, window
        self.start_s: float | None = None
        self.stop_s: float | None = None
        self.stop_call_s: float | None = None
        self.ended_s: float | None = None

    def tick(self, now: float, t0: float) -> None:
        w = self.window
        if w is None or self.stop_s is not None:
            return
        if self.start_s is None:
            if now >= w.start_s:
                self.start_s = now
                self.llm.start_profile(PROFILE_PREFIX)
        elif now >= self.start_s + w.duration_s:     # DURATION_S from the real start
            self._stop(now, t0)

    def finish(self, t0: float) -> None:
        self.ended_s = time.time() - t0
        if self.start_s is not None and self.stop_s is None:
            self._stop(self.ended_s, t0)

    def _stop(self, now: float, t0: float) -> None:
        self.stop_s = now
        self.llm.stop_profile()
        self.stop_call_s = time.time() - t0 - now

    def fields(self) -> dict[str, Any]:
        w = self.window
        if self.start_s is None:
            return {"profiled": False, "profile": {
                "requested": str(w), "error": f"the trace ended at {self.ended_s:.1f} s, before the "
                                              f"profile window's start ({w.start_s:g} s): nothing profiled"}}
        return {"profiled": True, "profile": {
            "requested": str(w), "start_s": round(self.start_s, 3), "stop_s": round(self.stop_s, 3),
            "stop_call_s": round(self.stop_call_s, 3)}}


def _summarize_profile(row: dict[str, Any], profile_dir: str, table_dest: str) -> None:
    """Fill the profiled row's `profile` from the engine core's trace and copy its table to
    `table_dest`. A missing or unreadable file is recorded in `profile.error` and printed, so
    the command keeps the rows it measured."""
    prof = row["profile"]
    if not row["profiled"]:
        print(f"[bench] profile: {prof['error']}", flush=True)
        return
    try:
        trace_path, trace = wait_for_trace(profile_dir, PROFILE_PREFIX)
        prof.update(trace_file=trace_path, **summarize_gpu_trace(trace))
        print(f"[bench] profile {prof['requested']} (trace clock {prof['start_s']}-{prof['stop_s']} s, "
              f"stop_profile took {prof['stop_call_s']} s): {describe(prof)}; trace {trace_path}",
              flush=True)
        prof["table_file"] = os.path.basename(copy_table(profile_dir, table_dest))
    except ProfileError as e:
        prof["error"] = str(e)
        print(f"[bench] profile FAILED: {e}", flush=True)


def _record(rec: dict[str, Any], out: Any, arrival_wall: float, finish_wall: float) -> None:
    m = out.metrics
    if m is None:
        raise BenchError("RequestOutput.metrics is None: the engine was started with "
                         "disable_log_stats=True (do not override it with --engine-arg)")
    n_out = len(out.outputs[0].token_ids)
    rec.update(finished=True, n_out=n_out,
               ttft_s=m.arrival_time + m.first_token_latency - arrival_wall,
               e2e_s=finish_wall - arrival_wall,
               tpot_s=(m.last_token_ts - m.first_token_ts) / (n_out - 1) if n_out > 1 else None)


#: Environment the runner gives vLLM unless the caller set these variables. `spawn`: with the
#: default `fork`, an engine core forked after this process had done CPU torch work (writing the
#: random adapters) hung while loading the model on the H100. Spawn starts it clean; the scripts
#: that call `run` keep their work under `if __name__ == "__main__":` for it. Same for every
#: system, so the comparison stays fair.
ENGINE_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def apply_engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Put ENGINE_ENV (and `extra`) into os.environ where not already set, before vLLM is
    imported; returns the values in effect, for the results file."""
    wanted = {**ENGINE_ENV, **(extra or {})}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in wanted}


def run(opts: RunOptions) -> str:
    """Start one engine, warm it up, run every trace, write rows after each; returns the path.

    Adapters are written before vLLM is imported and the engine core is spawned, not forked
    (see ENGINE_ENV). Internal files (the engine's logging config) go to a temporary directory
    removed on return; the environment variable naming it is unset again."""
    had_logging_config = "VLLM_LOGGING_CONFIG_PATH" in os.environ
    with tempfile.TemporaryDirectory(prefix="slora-bench-") as scratch:
        try:
            return _run(opts, scratch)
        finally:
            if not had_logging_config:
                os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)


def _run(opts: RunOptions, scratch: str) -> str:
    start = time.time()
    deadline = start + opts.deadline_s
    import slora_plugin

    if opts.system == "plugin":
        check_plugin_installed()
    model_cfg = load_model_config(opts.model)
    if os.path.isdir(opts.model):
        model_dir = opts.model
    else:
        model_dir = write_model_config(os.path.join(opts.work_dir, "model"), model_cfg)
    adapters = None
    if opts.system != "base":
        plan = adapter_plan(opts.traces)
        adapters = ServedAdapters(prepare_adapters(opts.work_dir, plan, model_cfg, opts.adapter_modules,
                                                   opts.distinct))
        if opts.compress_rank is not None:
            fleet = prepare_compressed(
                opts.work_dir, {a.name: a.group for a in fleet_of(plan, opts.distinct)},
                os.path.join(opts.work_dir, "variants"), ModelMemory.from_config(model_cfg).dims,
                opts.compress_rank, opts.compress_clusters)
            adapters = ServedAdapters(fleet.adapter_dir, fleet)
    environment = apply_engine_env()
    import vllm
    from vllm import LLM, SamplingParams

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    profile_dir = os.path.abspath(os.path.join(opts.work_dir, f"profile-{stamp}")) if opts.profile else None
    kw = engine_kwargs(opts, model_dir, adapters.adapter_dir if adapters else None, profile_dir)
    path = os.path.join(opts.out_dir, f"throughput-{opts.system}-{stamp}.json")
    requests_path = path[:-len(".json")] + "-requests.jsonl.gz"
    steps_path = path[:-len(".json")] + STEPS_SUFFIX
    pool_log = None
    if opts.system == "plugin":
        log_env = pool_log_env(path[:-len(".json")] + "-pool.log", scratch)
        if log_env is None:
            print("[bench] VLLM_LOGGING_CONFIG_PATH or VLLM_CONFIGURE_LOGGING=0 set by the caller: "
                  "no adapter load/eviction counts in the rows", flush=True)
        else:
            environment.update(apply_engine_env(log_env))
            pool_log = PoolLog(path[:-len(".json")] + "-pool.log")
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(),
        "vllm_version": vllm.__version__,
        "plugin_version": slora_plugin.__version__,
        "command": opts.command,
        "environment": environment,
        "workload": [t.spec.to_dict() for t in opts.traces],
        "model_config": model_cfg,
        "engine_kwargs": {k: v for k, v in kw.items() if k != "model"},
    }
    t = time.time()
    llm = LLM(**kw)
    init_s = time.time() - t
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    print(f"[bench] engine up in {init_s:.1f} s; KV cache {kv_tokens:,} tokens", flush=True)

    t = time.time()
    llm.generate([{"prompt_token_ids": [3 + (7 * k) % 1000 for k in range(256)]}] * WARMUP_REQUESTS,
                 SamplingParams(max_tokens=16, ignore_eos=True, temperature=0, detokenize=False),
                 lora_request=[_lora(opts, adapters, g) for g in range(WARMUP_REQUESTS)],
                 use_tqdm=False)
    warmup_s = time.time() - t

    def poke() -> None:
        """One no-LoRA token: a scheduler step, so the pool logs its counters (bench.pool_log)."""
        llm.generate([{"prompt_token_ids": [3, 5, 7, 11]}],
                     SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False),
                     use_tqdm=False)

    pool_before = pool_log.boundary(poke)[0] if pool_log else None
    rows: list[dict[str, Any]] = []
    vocab = int(model_cfg["vocab_size"])
    for index, (trace, offset) in enumerate(zip(opts.traces, trace_offsets(opts.traces))):
        if time.time() > deadline:
            print(f"[bench] deadline reached: skipping {trace.spec.label}", flush=True)
            continue
        window = opts.profile if opts.profile and opts.profile.trace_index == index else None
        preempted_before = preemption_count(llm)
        with GpuMemoryPoller() as mem:
            metrics, records, cut = run_trace(llm, opts, trace, offset, adapters, vocab, deadline,
                                              window)
        preempted_after = preemption_count(llm)
        if window is not None:
            _summarize_profile(metrics, profile_dir, path[:-len(".json")] + "-profile.txt")
        write_requests(requests_path, trace.spec.label, records)
        step_s = metrics.pop("step_s")
        write_steps(steps_path, trace.spec.label, step_s)
        pool: dict[str, Any] = dict.fromkeys(POOL_KEYS)
        if pool_log:
            pool_after, during = pool_log.boundary(poke)
            pool = pool_fields(pool_before, during, pool_after)
            pool_before = pool_after
        row = {"system": opts.system, "trace": trace.spec.label, "workload": trace.spec.to_dict(),
               "n_adapters": 0 if opts.system == "base" else trace.spec.n_adapters,
               "ranks": [] if opts.system == "base" else list(trace.spec.ranks),
               "adapter_modules": [] if opts.system == "base" else list(opts.adapter_modules),
               **metrics, "truncated": cut, "settings": _settings(kw),
               "init_s": round(init_s, 2), "warmup_s": round(warmup_s, 2),
               "kv_cache_tokens": kv_tokens, "gpu_mem_used_peak_mib": mem.peak_mib,
               "preemptions": None if None in (preempted_before, preempted_after)
               else preempted_after - preempted_before,
               **pool}
        if adapters is not None and adapters.compressed is not None:
            row["compressed"] = adapters.compressed.error_fields(
                [adapter_name(offset + j) for j in range(trace.spec.n_adapters)])
        _add_roofline(row, records, step_s, model_cfg, meta["device"], opts)
        rows.append(row)
        write_results(path, meta, rows)
        print(f"[bench] {opts.system} {trace.spec.label}: {row['req_per_s']:.2f} req/s, "
              f"{row['output_tok_per_s']:.1f} out tok/s, TTFT p50 {row['ttft_p50_s']} s, "
              f"preemptions {row['preemptions']}, adapter loads {row['adapter_loads']}, "
              f"evictions {row['adapter_evictions']}, host-load waits {row['host_load_waits']} "
              f"({row['host_load_wait_s']} s), {row.get('pct_of_roofline')}% of the roofline "
              f"({row.get('roofline_out_tok_per_s')} out tok/s)"
              + (" (cut by the deadline)" if cut else "")
              + (" (PROFILED: throughput perturbed)" if row.get("profiled") else ""), flush=True)
        if opts.system == "stock":
            for lora_id in list(llm.llm_engine.list_loras()):
                llm.llm_engine.remove_lora(lora_id)
    write_results(path, meta, rows)
    print(f"[bench] wrote {path} and {requests_path} ({time.time() - start:.0f} s in all)", flush=True)
    return path


def _add_roofline(row: dict[str, Any], records: Sequence[dict[str, Any]], step_s: Sequence[float],
                  model_cfg: dict[str, Any], device: str, opts: RunOptions) -> None:
    """The row's roofline keys (bench.roofline_rows), calibrated on the newest base row of this trace
    shape and device in the output directory. A failure is printed, not raised: the row's
    measurements are kept."""
    try:
        base = None if row["system"] == "base" else calibration_for(
            row, device, model_cfg, opts.out_dir, opts.copy_gbps, opts.peak_tflops)
        row.update(roofline_fields(row, records, step_s, model_cfg, opts.copy_gbps, opts.peak_tflops, base))
    except (ValueError, KeyError, OSError) as e:
        print(f"[bench] roofline FAILED for {row['trace']}: {e}", flush=True)


def write_requests(path: str, trace_label: str, records: Sequence[dict[str, Any]]) -> None:
    """Append one trace's per-request records (gzip JSON lines, tagged with the trace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with gzip.open(path, "at", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({"trace": trace_label, **rec}) + "\n")


def command_line() -> str:
    """The exact command, with the environment variables that change vLLM's behaviour."""
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in
                   ("PYTHONPATH", "VLLM_USE_FLASHINFER_SAMPLER", "CUDA_VISIBLE_DEVICES")
                   if k in os.environ)
    return (env + " " if env else "") + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
