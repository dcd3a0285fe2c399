"""Where the GPU time of a harness run goes: a torch-profiler window, summarized.

The throughput harness can run one window of one trace under vLLM's torch profiler
(`--profile INDEX:START_S:DURATION_S`, see `bench.run`). The engine core writes a Chrome trace
(`<prefix>_dp0_pp0_tp0....pt.trace.json.gz`) and a key-averages table (`profiler_out_0.txt`);
this module turns the trace into a small summary that fits in a results row, so "the plugin is
slow at 1,000 adapters" becomes "the GPU is idle x% of the window, and of its busy time y% is the
paged LoRA kernels". Pure Python, no vLLM or torch import: it runs and is tested on any machine.

GPU events of a torch (Kineto) Chrome trace are `"ph": "X"` events whose `cat` is `kernel`,
`gpu_memcpy` or `gpu_memset`, with `ts`/`dur` in microseconds (`gpu_user_annotation` spans on
the GPU track are labels, not work, and are left out). Busy time is the *union* of those
intervals over all streams, so two kernels overlapping on two streams count once; the category
times are plain sums, so with overlapping streams their shares of busy time can add up to more
than 1. One device is assumed (the harness runs TP=1).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: Summary categories, in the order they are reported.
CATEGORIES = ("lora", "adapter_write", "gemm", "attention", "memcpy_htod", "memcpy_other",
              "memset", "other")
#: Chrome-trace `cat` values of GPU work (lower case: older Kineto wrote "Kernel", "Memcpy").
GPU_CATS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "memcpy": "memcpy",
            "gpu_memset": "memset", "memset": "memset"}
#: Kernel name patterns (lower case), checked in this order; the first match wins.
#: lora: the plugin's paged kernels (`_shrink_kernel`, `_expand_kernel`) and stock vLLM's
#: punica kernels (`_lora_shrink_kernel`, `_lora_expand_kernel`, older sgmv/bgmv).
#: adapter_write: the plugin's page writer, the device half of an adapter load (the other half
#: is the staging copy, a memcpy HtoD).
#: attention before gemm: vLLM's FA3 kernels are `cutlass::device_kernel<flash::...>`; the KV
#: cache write (`reshape_and_cache_flash_kernel`) lands in attention too.
KERNEL_PATTERNS = (
    ("lora", ("shrink_kernel", "expand_kernel", "sgmv", "bgmv", "punica")),
    ("adapter_write", ("_page_writer_kernel",)),
    ("attention", ("flash", "fmha", "attention", "attn", "pagedkv", "paged_kv")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "gemv", "xmma", "splitkreduce")),
)
#: Top GPU operations listed by total time, and their names' length in the summary.
TOP_N = 15
NAME_CHARS = 80
#: File names the engine core writes into the profiler directory.
TRACE_GLOB = "{prefix}*.pt.trace.json*"
TABLE_NAME = "profiler_out_0.txt"


class ProfileError(ValueError):
    """A profile window or trace is malformed or missing; the message says which and why."""


@dataclass(frozen=True)
class ProfileWindow:
    """`--profile INDEX:START_S:DURATION_S`: trace INDEX of the command (0-based), from START_S
    after the trace's start, for DURATION_S (cut short when the trace ends first)."""

    trace_index: int
    start_s: float
    duration_s: float

    @classmethod
    def parse(cls, text: str) -> "ProfileWindow":
        parts = text.split(":")
        if len(parts) != 3:
            raise ProfileError(f"--profile: expected INDEX:START_S:DURATION_S (e.g. 0:15:5), got {text!r}")
        try:
            index, start, duration = int(parts[0]), float(parts[1]), float(parts[2])
        except ValueError:
            raise ProfileError(f"--profile: INDEX must be an integer and START_S, DURATION_S numbers, "
                               f"got {text!r}") from None
        if index < 0 or start < 0 or not duration > 0:
            raise ProfileError(f"--profile: need INDEX >= 0, START_S >= 0, DURATION_S > 0, got {text!r}")
        return cls(index, start, duration)

    def __str__(self) -> str:
        return f"{self.trace_index}:{self.start_s:g}:{self.duration_s:g}"


def category(name: str, kind: str) -> str:
    """Category of one GPU event: `kind` is "kernel", "memcpy" or "memset" (see GPU_CATS)."""
    if kind == "memset":
        return "memset"
    if kind == "memcpy":
        return "memcpy_htod" if "htod" in name.lower() else "memcpy_other"
    low = name.lower()
    for cat, patterns in KERNEL_PATTERNS:
        if any(p in low for p in patterns):
            return cat
    return "other"


def _gpu_events(trace: Mapping[str, Any]) -> Iterable[tuple[str, str, float, float, Any, Any]]:
    """(name, kind, start us, duration us, stream key, bytes) of every GPU event."""
    events = trace.get("traceEvents") if isinstance(trace, Mapping) else None
    if not isinstance(events, list):
        raise ProfileError("not a Chrome trace: no 'traceEvents' list")
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        kind = GPU_CATS.get(str(ev.get("cat", "")).lower())
        if kind is None or "ts" not in ev or "dur" not in ev:
            continue
        args = ev.get("args") or {}
        yield (str(ev.get("name", "")), kind, float(ev["ts"]), max(0.0, float(ev["dur"])),
               (ev.get("pid"), ev.get("tid")), args.get("bytes"))


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize_gpu_trace(trace: Mapping[str, Any]) -> dict[str, Any]:
    """Summary of the GPU work in a torch-profiler Chrome trace (the loaded JSON object).

    Returns `window_s` (first GPU event start to last GPU event end), `gpu_busy_s` (union over
    streams), `gpu_idle_s`, `gpu_idle_fraction`, `kernel_launches`, `gpu_events`, `streams`,
    `categories` ({name: {time_s, share_of_busy, count}, plus `bytes` for the memcpy ones}, in
    CATEGORIES order) and `top` (the TOP_N GPU operations by total time: name shortened to
    NAME_CHARS, category, count, total_s)."""
    intervals: list[tuple[float, float]] = []
    cat_us: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    cat_n: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    cat_bytes: dict[str, int] = {"memcpy_htod": 0, "memcpy_other": 0}
    by_name: dict[str, list] = defaultdict(lambda: [None, 0, 0.0])
    streams, launches = set(), 0
    for name, kind, ts, dur, stream, nbytes in _gpu_events(trace):
        cat = category(name, kind)
        intervals.append((ts, ts + dur))
        cat_us[cat] += dur
        cat_n[cat] += 1
        if cat in cat_bytes and isinstance(nbytes, (int, float)):
            cat_bytes[cat] += int(nbytes)
        entry = by_name[name]
        entry[0], entry[1], entry[2] = cat, entry[1] + 1, entry[2] + dur
        streams.add(stream)
        launches += kind == "kernel"
    if not intervals:
        raise ProfileError("no GPU events (kernel, gpu_memcpy, gpu_memset) in the trace: "
                           "was CUDA activity recorded, and did the window cover engine steps?")
    window_us = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy_us = _union_us(intervals)
    categories = {}
    for cat in CATEGORIES:
        categories[cat] = {"time_s": round(cat_us[cat] / 1e6, 6),
                           "share_of_busy": round(cat_us[cat] / busy_us, 4) if busy_us else 0.0,
                           "count": cat_n[cat]}
        if cat in cat_bytes:
            categories[cat]["bytes"] = cat_bytes[cat]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][2])[:TOP_N]
    return {
        "window_s": round(window_us / 1e6, 6),
        "gpu_busy_s": round(busy_us / 1e6, 6),
        "gpu_idle_s": round((window_us - busy_us) / 1e6, 6),
        "gpu_idle_fraction": round(1 - busy_us / window_us, 4) if window_us else 0.0,
        "kernel_launches": launches,
        "gpu_events": len(intervals),
        "streams": len(streams),
        "categories": categories,
        "top": [{"name": _short(name), "category": cat, "count": n, "total_s": round(us / 1e6, 6)}
                for name, (cat, n, us) in top],
    }


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def load_chrome_trace(path: str) -> dict[str, Any]:
    """Read a Chrome trace, `.json` or `.json.gz` (by the file's magic bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"trace {path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ProfileError(f"trace {path}: not a Chrome trace (no 'traceEvents' list)")
    return data


def wait_for_trace(directory: str, prefix: str, timeout_s: float = 180.0,
                   poll_s: float = 1.0) -> tuple[str, dict[str, Any]]:
    """(path, loaded trace) of the newest `<prefix>*.pt.trace.json[.gz]` in `directory`.

    The engine core writes the file when the profiler stops, and a gzip trace is written in
    one pass after the JSON export: a file that exists may still be incomplete. So this polls
    until a candidate loads completely, up to `timeout_s`; then the error names the directory,
    what was in it and the last read error."""
    deadline = time.monotonic() + timeout_s
    last_error = "no file yet"
    while True:
        paths = sorted(glob.glob(os.path.join(directory, TRACE_GLOB.format(prefix=glob.escape(prefix)))),
                       key=os.path.getmtime, reverse=True)
        for path in paths:
            try:
                return path, load_chrome_trace(path)
            except (ProfileError, FileNotFoundError) as e:
                last_error = str(e)
        if time.monotonic() >= deadline:
            have = sorted(os.listdir(directory)) if os.path.isdir(directory) else "directory missing"
            raise ProfileError(f"no complete profiler trace '{prefix}*.pt.trace.json[.gz]' in {directory} "
                               f"after {timeout_s:g} s (found: {have}; last: {last_error})")
        time.sleep(poll_s)


def copy_table(directory: str, dest: str, max_lines: int = 200, timeout_s: float = 30.0,
               poll_s: float = 1.0) -> str:
    """Copy vLLM's key-averages table (`profiler_out_0.txt`, written after the trace) to `dest`,
    its first `max_lines` lines; waits up to `timeout_s` for it to appear. Returns `dest`."""
    src = os.path.join(directory, TABLE_NAME)
    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(src):
        if time.monotonic() >= deadline:
            raise ProfileError(f"no {TABLE_NAME} in {directory} after {timeout_s:g} s: the engine "
                               f"core writes it after the trace (torch_profiler_dump_cuda_time_total)")
        time.sleep(poll_s)
    with open(src, encoding="utf-8", errors="replace") as f:
        lines = [ln for _, ln in zip(range(max_lines + 1), f)]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... (cut at {max_lines} lines; full table: {src})\n"]
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return dest


def describe(summary: Mapping[str, Any]) -> str:
    """One line for the console: busy/idle and the category shares of busy time."""
    shares = ", ".join(f"{cat} {100 * v['share_of_busy']:.1f}%"
                       for cat, v in summary["categories"].items() if v["count"])
    return (f"window {summary['window_s']:.2f} s, GPU busy {summary['gpu_busy_s']:.2f} s "
            f"(idle {100 * summary['gpu_idle_fraction']:.1f}%), {summary['kernel_launches']:,} "
            f"kernels; of busy time: {shares}")
