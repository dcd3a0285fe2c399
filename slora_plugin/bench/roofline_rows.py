"""Roofline fields of throughput rows: the harness's side of `slora_plugin.roofline`.

The runner (`bench.run`) records every engine step's end time next to its results
(`...-steps.jsonl.gz`, one line per trace: `{"trace", "step_s"}`) and calls `roofline_fields`
for each row; `benchmarks/roofline.py` does the same on CPU for results recorded before (their
steps reconstructed from the per-request records, see `roofline.reconstruct_steps`).

How the step was observed. vLLM 0.26 sends one `EngineCoreOutputs` per engine step to the
front end when stats are on (`disable_log_stats=False`, which the harness sets: the scheduler
stats ride on it even in a step without tokens), and `LLMEngine.step()` consumes exactly one of
them; so the harness's own loop, timing each `step()` call, sees every step, with public API
only. Which requests were in a step, with which KV lengths, follows from each request's
first-token and finish times (`roofline.run_steps`). This was preferred to reading the running
set from the engine front end's request states or a custom stat logger attached after `LLM()`
was built (exact under preemption too, but private names of vLLM and work in the measured loop),
and to a patch in the engine core (another process, a second channel back): the error it leaves
is bounded (preempted requests, below) and the same code prices the runs recorded before it.

What an adapter costs (`adapter_costs`): the plugin reads an adapter's rows at their real rank on
the modules it targets (`adapter_modules` of the row; q,k,v,o for rows recorded before it was
kept); stock vLLM reads its slot, padded to `max_lora_rank` in every layer it wraps, which is
`plan.stock_slot_bytes` for one slot; an adapter of a compressed collection (a row with
`compressed`) reads its K x K cores, and every step reads the collection's shared bases
(`compressed_costs`).

Calibration: the base model's efficiency `eta` (see `roofline`) comes from a base row of the same
trace shape on the same device: the row itself for a base run, else the newest such row among the
given results files (`find_base`; the runner looks in its output directory). Rows without one are
priced at `eta` = 1 and say so (`roofline.calibrated_on` is None).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from slora_plugin.bench.plan import stock_slot_bytes
from slora_plugin.bench.command import model_arg
from slora_plugin.bench.report import shape_key
from slora_plugin.model_config import ModelMemory, load_model_config
from slora_plugin.roofline import (
    H100_COPY_GBPS, H100_PEAK_TFLOPS, AdapterCost, ModelBytes, RequestSpan, RunSteps, arrival_bound,
    base_efficiency, reconstruct_steps, reconstruction_check, run_roofline, run_steps, spans_from_records)

STEPS_SUFFIX = "-steps.jsonl.gz"
REQUESTS_SUFFIX = "-requests.jsonl.gz"
#: The adapters' modules of rows recorded before the runner kept `adapter_modules`.
DEFAULT_ADAPTER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Row keys this module adds.
ROOFLINE_KEYS = ("roofline_out_tok_per_s", "pct_of_roofline", "distinct_adapters_per_step_mean",
                 "adapter_bytes_per_step_mean", "batch_size_per_step_mean", "kv_tokens_per_step_mean",
                 "roofline")


def side_file(results_path: str, suffix: str) -> str:
    """`throughput-x.json` -> `throughput-x<suffix>`."""
    return results_path[:-len(".json")] + suffix


def write_steps(path: str, trace_label: str, step_s: Sequence[float]) -> None:
    """Append one trace's step end times (seconds on the trace's clock, gzip JSON lines)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with gzip.open(path, "at", encoding="utf-8") as f:
        f.write(json.dumps({"trace": trace_label, "step_s": [round(t, 6) for t in step_s]}) + "\n")


def read_side(results_path: str, suffix: str, trace_label: str) -> list[dict[str, Any]]:
    """The lines of a side file (requests or steps) that belong to one trace; [] if absent."""
    path = side_file(results_path, suffix)
    if not os.path.isfile(path):
        return []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [rec for rec in map(json.loads, f) if rec.get("trace") == trace_label]


def model_config_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The model config a results file ran: recorded in `model_config`, or (older files) the
    known model named by `--model` in its command, Llama-2-7B by default."""
    if meta.get("model_config"):
        return dict(meta["model_config"])
    return load_model_config(model_arg(meta.get("command", "")))


def model_bytes(model_cfg: Mapping[str, Any]) -> ModelBytes:
    mem = ModelMemory.from_config(model_cfg)
    return ModelBytes(mem.dims, mem.vocab_size, mem.dtype_bytes)


def adapter_costs(row: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> Callable[[int], AdapterCost | None]:
    """Price of trace-local adapter j of the row (rank `ranks[j % len(ranks)]`, the harness's
    mix) for its system; None for the base model."""
    if row["system"] == "base":
        return lambda adapter: None
    mem = ModelMemory.from_config(model_cfg)
    ranks = list(row["workload"]["ranks"])
    compressed = compressed_costs(row, model_cfg)
    if compressed is not None:
        return lambda adapter: compressed[1]
    if row["system"] == "stock":
        s = row["settings"]
        slot = stock_slot_bytes(mem, 1, int(s.get("max_lora_rank") or max(ranks)), s.get("lora_target_modules"))
        padded = AdapterCost(slot, slot // mem.dtype_bytes)
        return lambda adapter: padded
    modules = row.get("adapter_modules") or DEFAULT_ADAPTER_MODULES
    mb = model_bytes(model_cfg)
    by_rank = {r: mb.adapter_elems({m: r for m in modules}) for r in set(ranks)}
    table = {r: AdapterCost(e * mem.dtype_bytes, e) for r, e in by_rank.items()}
    return lambda adapter: table[ranks[adapter % len(ranks)]]


def compressed_costs(row: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> tuple[int, AdapterCost] | None:
    """(bytes of the shared bases every step reads, one adapter's cost) of a plugin row served
    from a compressed collection of rank K (the row's `compressed`, `bench.compressed_fleet`);
    None for other rows. An adapter's bytes are its K x K cores on every (layer, module) it
    adapts; a token multiplies K (in + out) + K^2 weights there (bases, then its core)."""
    if not row.get("compressed"):
        return None
    mem = ModelMemory.from_config(model_cfg)
    k, clusters = int(row["compressed"]["rank_k"]), int(row["compressed"]["clusters"])
    modules = row.get("adapter_modules") or DEFAULT_ADAPTER_MODULES
    pairs = mem.dims.num_hidden_layers * len(modules)
    bases = mem.dims.num_hidden_layers * sum(k * sum(mem.dims.module_io(m)) for m in modules)
    cores = pairs * k * k
    return clusters * bases * mem.dtype_bytes, AdapterCost(cores * mem.dtype_bytes, bases + cores)


def row_steps(row: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
              step_s: Sequence[float] | None, model_cfg: Mapping[str, Any],
              ) -> tuple[RunSteps, dict[str, Any], list[RequestSpan]]:
    """The row's steps (recorded, or reconstructed when `step_s` is None), how they were got,
    and the finished requests' spans."""
    spans = spans_from_records(records)
    source = "recorded" if step_s else "reconstructed"
    grid, spans = (list(step_s), spans) if step_s else reconstruct_steps(spans)
    check = reconstruction_check(spans, grid)
    how = {"steps_source": source, "step_count_check": None if check is None else round(check, 3)}
    return run_steps(spans, grid, adapter_costs(row, model_cfg)), how, spans


def roofline_fields(row: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                    step_s: Sequence[float] | None, model_cfg: Mapping[str, Any],
                    gbps: float = H100_COPY_GBPS, tflops: float = H100_PEAK_TFLOPS,
                    base: tuple[float, str] | None = None) -> dict[str, Any]:
    """The row's roofline keys (ROOFLINE_KEYS). `base` = (eta, where it comes from); a base row
    is calibrated on itself when `base` is None."""
    mb = model_bytes(model_cfg)
    compressed = compressed_costs(row, model_cfg)
    if compressed is not None:
        mb = replace(mb, shared_bytes=compressed[0])
    steps, how, spans = row_steps(row, records, step_s, model_cfg)
    out_tokens = sum(int(r["n_out"]) for r in records if r.get("finished"))
    duration = float(row["duration_s"])
    if base is None and row["system"] == "base" and steps.loads:
        base = (base_efficiency(mb, steps, gbps, tflops), "this row")
    eta, calibrated_on = base if base else (1.0, None)
    cost = adapter_costs(row, model_cfg)
    rl = run_roofline(mb, steps, duration, out_tokens, gbps, tflops, eta,
                      arrival_bound(mb, spans, cost, gbps, tflops, eta))
    pure = run_roofline(mb, steps, duration, out_tokens, gbps, tflops, 1.0,
                        arrival_bound(mb, spans, cost, gbps, tflops, 1.0))
    return {
        "roofline_out_tok_per_s": round(rl.roofline_out_tok_per_s, 1),
        "pct_of_roofline": round(rl.pct_of_roofline, 1),
        "distinct_adapters_per_step_mean": round(rl.distinct_adapters_per_step_mean, 2),
        "adapter_bytes_per_step_mean": round(rl.adapter_bytes_per_step_mean),
        "batch_size_per_step_mean": round(rl.batch_size_per_step_mean, 2),
        "kv_tokens_per_step_mean": round(rl.kv_tokens_per_step_mean),
        "roofline": {
            "copy_gbps": gbps, "peak_tflops": tflops, "base_efficiency": round(eta, 4),
            "calibrated_on": calibrated_on, **how, "steps": rl.steps, "busy_s": round(rl.busy_s, 3),
            "ideal_busy_s": round(rl.ideal_busy_s, 3), "pct_of_roofline_busy": round(rl.pct_of_roofline_busy, 1),
            "bytes_only_out_tok_per_s": round(pure.roofline_out_tok_per_s, 1),
            "by_step_kind": {kind: {"steps": k.steps, "busy_s": round(k.busy_s, 3), "ideal_s": round(k.ideal_s, 3),
                                    "adapter_ideal_s": round(k.adapter_ideal_s, 3),
                                    "pct_of_roofline_busy": round(k.pct_of_roofline, 1)}
                             for kind, k in rl.by_kind.items()},
        },
    }


def find_base(results_paths: Iterable[str], device: str, workload: Mapping[str, Any],
              model_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The newest unprofiled base row with the same trace shape, device and model among the
    results files, as (its file, the row); None if there is none."""
    best = None
    for path in results_paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("device") != device or model_config_of(data) != dict(model_cfg):
            continue
        for r in data.get("rows", []):
            if (r.get("system") == "base" and not r.get("profiled")
                    and shape_key(r["workload"]) == shape_key(workload)
                    and (best is None or data.get("date", "") > best[0])):
                best = (data.get("date", ""), path, r)
    return None if best is None else (best[1], best[2])


def base_calibration(path: str, base_row: Mapping[str, Any], model_cfg: Mapping[str, Any],
                     gbps: float, tflops: float) -> tuple[float, str] | None:
    """(eta, "file: trace") of a base row, from its side files; None without its requests."""
    records = read_side(path, REQUESTS_SUFFIX, base_row["trace"])
    if not records:
        return None
    steps_line = read_side(path, STEPS_SUFFIX, base_row["trace"])
    steps, _, _ = row_steps(base_row, records, steps_line[0]["step_s"] if steps_line else None, model_cfg)
    if not steps.loads:
        return None
    eta = base_efficiency(model_bytes(model_cfg), steps, gbps, tflops)
    return eta, f"{os.path.basename(path)}: {base_row['trace']}"


def calibration_for(row: Mapping[str, Any], device: str, model_cfg: Mapping[str, Any], results_dir: str,
                    gbps: float = H100_COPY_GBPS, tflops: float = H100_PEAK_TFLOPS) -> tuple[float, str] | None:
    """(eta, where from) for a row, from the newest matching base row in `results_dir`."""
    found = find_base(sorted(glob.glob(os.path.join(results_dir, "throughput-base-*.json"))),
                      device, row["workload"], model_cfg)
    return found and base_calibration(found[0], found[1], model_cfg, gbps, tflops)


def fill_file(path: str, candidates: Sequence[str], gbps: float = H100_COPY_GBPS,
              tflops: float = H100_PEAK_TFLOPS) -> list[dict[str, Any]]:
    """Every row of one results file with its roofline keys computed from its side files
    (calibrated on a base row among `candidates`); rows without request records are left as
    they are. Nothing is written."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    cfg = model_config_of(data)
    rows = []
    for row in data["rows"]:
        records = read_side(path, REQUESTS_SUFFIX, row["trace"])
        if not records:
            rows.append(dict(row))
            continue
        steps_line = read_side(path, STEPS_SUFFIX, row["trace"])
        base = None
        if row["system"] != "base":
            found = find_base(candidates, data["device"], row["workload"], cfg)
            base = found and base_calibration(found[0], found[1], cfg, gbps, tflops)
        rows.append({**row, **roofline_fields(row, records, steps_line[0]["step_s"] if steps_line else None,
                                              cfg, gbps, tflops, base)})
    return rows


def roofline_table(files_rows: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> str:
    """Markdown: measured against roofline for every row that has one, with what it was made
    of; `files_rows` pairs a results file's base name with its rows (`fill_file`)."""
    head = ["file", "trace", "system", "adapters", "measured out tok/s", "roofline out tok/s",
            "% of roofline", "% of roofline, busy steps", "decode-only / prefill steps: s measured (% of roofline)",
            "base eta (calibrated on)", "batch / step",
            "KV tokens / step", "distinct adapters / step", "adapter GB / step", "steps (source, check)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in files_rows:
        for r in rows:
            rl = r.get("roofline")
            if not rl:
                continue
            flags = (" (cut)" if r.get("truncated") else "") + (" (PROFILED)" if r.get("profiled") else "")
            cal = (rl["calibrated_on"] or "none: eta = 1").replace("throughput-", "").replace(".json", "")
            lines.append("| " + " | ".join([
                name.replace("throughput-", "").replace(".json", ""), r["trace"] + flags, r["system"],
                f"{r['n_adapters']:,}", f"{r['output_tok_per_s']:,.0f}", f"{r['roofline_out_tok_per_s']:,.0f}",
                f"{r['pct_of_roofline']:.1f}", f"{rl['pct_of_roofline_busy']:.1f}", _by_kind(rl),
                f"{rl['base_efficiency']:.3f} ({cal})", f"{r['batch_size_per_step_mean']:.1f}",
                f"{r['kv_tokens_per_step_mean']:,}", f"{r['distinct_adapters_per_step_mean']:.1f}",
                f"{r['adapter_bytes_per_step_mean'] / 1e9:.2f}",
                f"{rl['steps']:,} ({rl['steps_source']}, {rl['step_count_check']})"]) + " |")
    return "\n".join(lines)


def _by_kind(rl: Mapping[str, Any]) -> str:
    """The decode-only and the prefill steps' busy seconds and % of their roofline ("-" for rows
    recorded before the split was kept)."""
    kinds = rl.get("by_step_kind")
    if not kinds:
        return "-"
    return " / ".join(f"{kinds[k]['busy_s']:.1f} ({kinds[k]['pct_of_roofline_busy']:.0f}%)" if k in kinds else "-"
                      for k in ("decode", "prefill"))
