"""Throughput results: per-request records -> a row, result files -> tables and plots.

The runner (`slora_plugin.bench.run`) measures; this module only computes and formats, so the
report can be regenerated, and tested, on a machine without a GPU.

A results file (`benchmarks/results/throughput-<system>-<stamp>.json`) is one object:
`date`, `device`, `vllm_version`, `plugin_version`, `command`, `workload` (the list of trace
specs the command ran) and `rows`. A row is one (system, trace): `system` (base, stock, plugin),
`trace` (its label), `workload` (its spec), `n_adapters`, `ranks`, `requests`, `completed`, `duration_s`, `req_per_s`,
`output_tok_per_s`, `total_tok_per_s`, `ttft_p50_s`, `ttft_p99_s`, `tpot_p50_s`, `tpot_p99_s`,
`e2e_p50_s`, `e2e_p99_s`, `slo_ttft_s`, `slo_attainment`, `ttft_quantiles_s` and
`e2e_quantiles_s` (101 percentiles, for CDF plots), `settings`, `init_s`, what the runner
knows of memory (`kv_cache_tokens`, `gpu_mem_used_peak_mib`) and counters (`preemptions`;
for the plugin `adapter_loads`, `adapter_evictions`, `pages_total`, `adapter_pages_peak`,
`adapters_resident_peak`, `host_load_hits`, `host_load_waits`, `host_load_wait_s`; see
`bench.pool_log`). Counters may be absent (older files) or None
(unknown); the table shows "-" for both. Rows recorded since the roofline (`bench.roofline_rows`)
also have `adapter_modules`, `roofline_out_tok_per_s`, `pct_of_roofline`,
`distinct_adapters_per_step_mean`, `adapter_bytes_per_step_mean`, `batch_size_per_step_mean`,
`kv_tokens_per_step_mean` and `roofline` (how it was computed); the table shows the roofline
next to the measured throughput and `plot_roofline` draws both.

Rows are comparable when they share a model (the command's `--model`) and a trace shape
(`shape_key`): one table group and one plot panel each. A row that served a compressed collection
(`compressed` in the row) is its own system, "plugin compressed K=<k>". The table lists every row;
the plots draw only each system's newest run in a panel (the newest file that has it), so runs of
other days and settings do not zigzag into one line.

A row with `profiled: true` ran (partly) under the torch profiler (`bench.run`, `--profile`): its
throughput and latencies are perturbed, so the table marks it, it is never the "vs base"
reference, the plots leave it out, and its `profile` summary (`bench.profile`) gets a table of
its own: where the GPU time of the window went.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from slora_plugin.bench.profile import CATEGORIES
from slora_plugin.bench.command import model_name

ROW_KEYS = ("system", "trace", "workload", "n_adapters", "ranks", "req_per_s", "output_tok_per_s", "ttft_p50_s",
            "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "settings", "init_s")
TOP_KEYS = ("date", "device", "vllm_version", "plugin_version", "command", "workload", "rows")


class ReportError(ValueError):
    """A results file is missing or malformed; the message names the file."""


def summarize(records: Sequence[Mapping[str, Any]], duration_s: float,
              slo_ttft_s: float) -> dict[str, Any]:
    """Row metrics from per-request records.

    A record has `input_len`, `n_out` (tokens generated), `finished`, and for finished requests
    `ttft_s`, `e2e_s` (from the request's arrival) and `tpot_s` (None with one output token).
    Throughput counts finished requests over `duration_s`; SLO attainment is over *all*
    requests, an unfinished one counting as a miss.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r["finished"]]
    ttft = [r["ttft_s"] for r in done]
    e2e = [r["e2e_s"] for r in done]
    tpot = [r["tpot_s"] for r in done if r["tpot_s"] is not None]
    out_tokens = sum(r["n_out"] for r in done)
    in_tokens = sum(r["input_len"] for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "duration_s": round(duration_s, 4),
        "req_per_s": len(done) / duration_s,
        "output_tok_per_s": out_tokens / duration_s,
        "total_tok_per_s": (out_tokens + in_tokens) / duration_s,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
        "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
        "slo_ttft_s": slo_ttft_s,
        "slo_attainment": (sum(t <= slo_ttft_s for t in ttft) / len(records)) if records else None,
        "ttft_quantiles_s": _quantiles(ttft),
        "e2e_quantiles_s": _quantiles(e2e),
    }


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _quantiles(values: Sequence[float]) -> list[float]:
    if not len(values):
        return []
    return [round(float(v), 5) for v in np.percentile(values, np.arange(101))]


def write_results(path: str, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """Write (or rewrite, after every trace) one results file atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**meta, "rows": list(rows)}, f, indent=1)
    os.replace(tmp, path)
    return path


def load_results(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Read results files; every row gets `_file` (the file's base name) for the table."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"results {path}: cannot read ({e})") from None
        missing = [k for k in TOP_KEYS if k not in data]
        if missing:
            raise ReportError(f"results {path}: missing top-level key(s) {missing}")
        for i, row in enumerate(data["rows"]):
            lacking = [k for k in ROW_KEYS if k not in row]
            if lacking:
                raise ReportError(f"results {path}: row {i} lacks {lacking}")
        data["_file"] = os.path.basename(path)
        out.append(data)
    return out


def shape_key(workload: Mapping[str, Any]) -> str:
    """What makes two rows comparable: the trace without its adapter count and popularity."""
    how = {"all": "all-at-once", "closed": f"closed-{workload.get('concurrency')}",
           "gamma": f"gamma rate {workload.get('rate'):g} cv {workload.get('cv'):g}"}
    i, o = workload["input_len"], workload["output_len"]
    lens = lambda r: f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"  # noqa: E731
    return (f"{how.get(workload['arrival'], workload['arrival'])}, {workload['num_requests']} req, "
            f"in {lens(i)} / out {lens(o)}")


def system_label(row: Mapping[str, Any]) -> str:
    """The row's system, and its compression when it served a compressed collection."""
    compressed = row.get("compressed")
    return f"{row['system']} compressed K={compressed['rank_k']}" if compressed else row["system"]


def all_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of every file, with `_model` (the command's `--model`), `_shape` (the model and
    `shape_key`: what makes rows comparable), `_system` (`system_label`) and the file's device,
    date and name."""
    rows = []
    for res in results:
        model = model_name(res["command"])
        for row in res["rows"]:
            rows.append({**row, "_model": model, "_shape": f"{model}: {shape_key(row['workload'])}",
                         "_system": system_label(row), "_device": res["device"], "_date": res["date"],
                         "_file": res["_file"]})
    return rows


def newest_runs(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Of each (`_shape`, `_system`), the rows of its newest file (by date, then file name, whose
    time stamp orders runs of one day)."""
    newest: dict[tuple[str, str], tuple[str, str]] = {}
    for r in rows:
        key = (r["_shape"], r["_system"])
        newest[key] = max(newest.get(key, ("", "")), (r["_date"], r["_file"]))
    return [r for r in rows if newest[(r["_shape"], r["_system"])] == (r["_date"], r["_file"])]


_SYSTEM_ORDER = {"base": 0, "stock": 1, "plugin": 2}


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One table over all files, grouped by model and trace shape; 'vs base' divides output tok/s
    by the newest unprofiled base row of the same model and shape (if any)."""
    rows = sorted(all_rows(results), key=lambda r: (r["_shape"], _SYSTEM_ORDER.get(r["system"], 9),
                                                    r["_system"], r["n_adapters"], r["_date"], r["_file"]))
    base = {r["_shape"]: r["output_tok_per_s"] for r in sorted(rows, key=lambda r: (r["_date"], r["_file"]))
            if r["system"] == "base" and not r.get("profiled")}
    head = ["trace", "system", "adapters", "ranks", "done/req", "req/s", "out tok/s", "vs base",
            "roofline tok/s (% of it)", "TTFT p50/p99 s", "TPOT p50/p99 ms", "SLO TTFT", "preempt", "loads / evictions",
            "adapter pages peak", "host-load waits (s)", "KV tokens", "init s", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = base.get(r["_shape"])
        slo = r.get("slo_attainment")
        cells = [
            r["_shape"], r["_system"], f"{r['n_adapters']:,}",
            "/".join(str(k) for k in r.get("ranks") or []) or "-",
            f"{r.get('completed', '?')}/{r.get('requests', '?')}" + (" (cut)" if r.get("truncated") else ""),
            _num(r["req_per_s"], 2), _num(r["output_tok_per_s"], 1),
            _num(r["output_tok_per_s"] / ref, 3) if ref else "-",
            "-" if r.get("roofline_out_tok_per_s") is None
            else f"{_num(r['roofline_out_tok_per_s'], 1)} ({_num(r.get('pct_of_roofline'), 1)}%)",
            f"{_num(r['ttft_p50_s'], 2)} / {_num(r['ttft_p99_s'], 2)}",
            f"{_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p99_s'])}",
            "-" if slo is None else f"{100 * slo:.1f}% <= {r.get('slo_ttft_s'):g} s",
            _num(r.get("preemptions"), 0),
            f"{_num(r.get('adapter_loads'), 0)} / {_num(r.get('adapter_evictions'), 0)}",
            "-" if r.get("adapter_pages_peak") is None
            else f"{_num(r['adapter_pages_peak'], 0)} of {_num(r.get('pages_total'), 0)}",
            "-" if r.get("host_load_waits") is None
            else f"{_num(r['host_load_waits'], 0)} ({_num(r.get('host_load_wait_s'), 1)})",
            _num(r.get("kv_cache_tokens"), 0), _num(r["init_s"], 1),
            _settings(r["settings"], r.get("profiled", False)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({r["_device"] for r in rows})
    lines.append("")
    lines.append(f"Device(s): {', '.join(devices)}. Files: "
                 f"{', '.join(sorted({r['_file'] for r in rows}))}.")
    profiled = [r for r in rows if r.get("profiled") and (r.get("profile") or {}).get("categories")]
    if profiled:
        lines += ["", profile_table(profiled)]
    return "\n".join(lines)


def profile_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Where the GPU time of each profiled window went: busy and idle time of the window, and
    each category's share of the busy time (sums over streams, so shares can add to > 100%
    where streams overlap), and the top GPU operation."""
    head = ["trace", "system", "adapters", "window (trace clock)", "GPU window s", "GPU idle",
            *[f"{c} % busy" for c in CATEGORIES], "kernels", "top GPU op (share of busy)"]
    lines = ["GPU time in the profiled windows (torch profiler; see slora_plugin.bench.profile):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["profile"]
        busy = p["gpu_busy_s"]
        top = p["top"][0] if p["top"] else None
        cells = [r["_shape"], r["_system"], f"{r['n_adapters']:,}", f"{p['start_s']:g}-{p['stop_s']:g} s",
                 _num(p["window_s"], 2), f"{100 * p['gpu_idle_fraction']:.1f}%",
                 *[f"{100 * p['categories'][c]['share_of_busy']:.1f}" for c in CATEGORIES],
                 f"{p['kernel_launches']:,}",
                 "-" if top is None else f"`{top['name']}` ({100 * top['total_s'] / busy:.1f}%)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def _settings(s: Mapping[str, Any], profiled: bool = False) -> str:
    """Engine arguments and the plugin's own settings (the adapter directory left out: it is
    the same for every row of a run), so rows of one system run differently are told apart;
    a profiled row says so first."""
    parts = ["PROFILED (throughput perturbed, not a result)"] if profiled else []
    parts += [f"{k}={v}" for k, v in s.items() if k != "additional_config"]
    slora = (s.get("additional_config") or {}).get("slora") or {}
    parts += [f"slora.{k}={v}" for k, v in slora.items() if k != "adapter_dir"]
    return ", ".join(parts) or "-"


def plot_throughput(results: Sequence[Mapping[str, Any]], path: str) -> str:
    """Output tok/s against the number of adapters, one panel per model and trace shape, one line
    per system (its newest run); the base model (no adapters) is a dashed horizontal line."""
    plt = _pyplot()
    rows = newest_runs([r for r in all_rows(results) if not r.get("profiled")])
    shapes = sorted({r["_shape"] for r in rows})
    if not shapes:
        raise ReportError("every row is profiled; nothing to plot")
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        here = [r for r in rows if r["_shape"] == shape]
        for system in sorted({r["_system"] for r in here}, key=lambda s: (_SYSTEM_ORDER.get(s, 9), s)):
            pts = sorted((r["n_adapters"], r["output_tok_per_s"]) for r in here if r["_system"] == system)
            if system == "base" or all(n == 0 for n, _ in pts):
                for _, y in pts:
                    ax.axhline(y, linestyle="--", color="gray", label=f"{system} (no LoRA)")
                continue
            ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o", label=system)
        ax.set_xscale("log")
        ax.set_xlabel("adapters in the trace")
        ax.set_ylabel("output tokens / s")
        ax.set_title(shape, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_roofline(results: Sequence[Mapping[str, Any]], path: str) -> str:
    """Measured output tok/s against the row's roofline (`bench.roofline_rows`), one panel per
    model and trace shape, one pair of bars per row of each system's newest run that has one
    (profiled rows left out)."""
    plt = _pyplot()
    rows = newest_runs([r for r in all_rows(results)
                        if r.get("roofline_out_tok_per_s") is not None and not r.get("profiled")])
    shapes = sorted({r["_shape"] for r in rows})
    if not shapes:
        raise ReportError("no unprofiled row has a roofline; nothing to plot")
    widths = [max(4.0, 1.1 * sum(r["_shape"] == shape for r in rows)) for shape in shapes]
    fig, axes = plt.subplots(1, len(shapes), figsize=(sum(widths) + 1, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, shape in zip(axes[0], shapes):
        here = sorted((r for r in rows if r["_shape"] == shape),
                      key=lambda r: (_SYSTEM_ORDER.get(r["system"], 9), r["_system"], r["n_adapters"]))
        x = np.arange(len(here))
        ax.bar(x - 0.2, [r["output_tok_per_s"] for r in here], 0.4, label="measured")
        ax.bar(x + 0.2, [r["roofline_out_tok_per_s"] for r in here], 0.4, label="roofline", alpha=0.6)
        for i, r in enumerate(here):
            ax.annotate(f"{r['pct_of_roofline']:.0f}%", (i - 0.2, r["output_tok_per_s"]),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [f"{r['_system'].replace(' ', chr(10), 1)}\nN={r['n_adapters']:,}" for r in here],
                      fontsize=7)
        ax.set_ylabel("output tokens / s")
        ax.set_title(shape, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_latency_cdf(results: Sequence[Mapping[str, Any]], path: str,
                     which: str = "ttft_quantiles_s") -> str:
    """CDF of time to first token (or `e2e_quantiles_s`), one panel per model and trace shape,
    one line per (system, adapters) of each system's newest run; the SLO is a vertical line."""
    plt = _pyplot()
    rows = newest_runs([r for r in all_rows(results) if r.get(which) and not r.get("profiled")])
    shapes = sorted({r["_shape"] for r in rows})
    if not shapes:
        raise ReportError(f"no row has {which}; nothing to plot")
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    frac = np.arange(101) / 100
    for ax, shape in zip(axes[0], shapes):
        here = sorted((r for r in rows if r["_shape"] == shape),
                      key=lambda r: (_SYSTEM_ORDER.get(r["system"], 9), r["_system"], r["n_adapters"]))
        for r in here:
            ax.plot(r[which], frac, label=f"{r['_system']} N={r['n_adapters']}")
        slos = {r["slo_ttft_s"] for r in here if r.get("slo_ttft_s") is not None}
        if which == "ttft_quantiles_s":
            for s in slos:
                ax.axvline(s, color="red", linestyle=":", label=f"SLO {s:g} s")
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (s)" if which == "ttft_quantiles_s" else "end-to-end latency (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(shape, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str], out_dir: str, name: str = "throughput") -> dict[str, str]:
    """The whole report: `<name>.md` (table), `<name>-vs-adapters.png`, `<name>-ttft-cdf.png`
    (the plots only when some row is not profiled), and `<name>-roofline.png` when some
    unprofiled row has a roofline."""
    results = load_results(paths)
    if not any(res["rows"] for res in results):
        raise ReportError(f"no rows in {list(paths)}")
    md = os.path.join(out_dir, f"{name}.md")
    os.makedirs(out_dir, exist_ok=True)
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown_table(results) + "\n")
    out = {"table": md}
    if any(not row.get("profiled") for res in results for row in res["rows"]):
        out["throughput_plot"] = plot_throughput(results, os.path.join(out_dir, f"{name}-vs-adapters.png"))
        out["ttft_cdf_plot"] = plot_latency_cdf(results, os.path.join(out_dir, f"{name}-ttft-cdf.png"))
    if any(row.get("roofline_out_tok_per_s") is not None and not row.get("profiled")
           for res in results for row in res["rows"]):
        out["roofline_plot"] = plot_roofline(results, os.path.join(out_dir, f"{name}-roofline.png"))
    return out
