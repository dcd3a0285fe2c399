"""`slora-plugin bench trace | plan | run | report`: the throughput harness on the command line.

`add_subparser(subparsers)` registers `bench` on the main CLI; every leaf sets `func`, which
takes the parsed namespace and returns the exit status. `main(argv)` runs the bench commands on
their own (for the scripts in benchmarks/). Only `run` needs a GPU and vLLM's engine; it is
imported lazily so `plan`, `trace` and `report` stay fast on a laptop.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Sequence

from slora_plugin.bench.workload import (
    WorkloadError, WorkloadSpec, adapter_counts, gap_stats, generate, load_trace, parse_spec,
    save_trace)
from slora_plugin.config import parse_json_object

DEFAULT_GAMMA = "n=1000,arrival=gamma,rate=4,cv=1,requests=240,in=8-512,out=8-512"
#: Results folder of the console script: relative to the current directory. The scripts in
#: benchmarks/ pass their own folder's results/ instead, so they do not depend on the cwd.
DEFAULT_RESULTS = os.path.join("benchmarks", "results")


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` and its four subcommands on an argparse subparsers object."""
    bench = subparsers.add_parser(
        "bench", help="throughput harness: traces, memory plan, GPU runs, reports",
        description="Benchmark the base model, stock vLLM multi-LoRA and the plugin on the same traces.")
    _add_commands(bench)
    return bench


def main(argv: Sequence[str] | None = None, results_dir: str = DEFAULT_RESULTS) -> int:
    """Run one bench command; `results_dir` is the default of `--out-dir` and of report's input."""
    parser = argparse.ArgumentParser(prog="slora-plugin bench")
    _add_commands(parser, results_dir)
    args = parser.parse_args(argv)
    return args.func(args)


def _add_commands(parser: argparse.ArgumentParser, results_dir: str = DEFAULT_RESULTS) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("trace", help="generate a trace file (JSON lines) from a workload spec")
    p.add_argument("out", help="trace file to write")
    _workload_flags(p)
    p.add_argument("--n-adapters", type=int, default=100)
    p.add_argument("--spec", default="", help='extra fields, e.g. "arrival=gamma,rate=4,cv=1"')
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("plan", help="KV vs adapter memory: plugin pages against stock slots (no GPU)")
    p.add_argument("--model", default="llama-2-7b", help="'llama-2-7b', a directory with config.json, or its path")
    p.add_argument("--gpu-gib", type=float, default=80.0,
                   help="GPU memory as torch reports it (an 'H100 80GB' reports about 79.2)")
    p.add_argument("--utilization", type=float, default=0.9, help="vLLM's gpu_memory_utilization")
    p.add_argument("--overhead-gib", type=float, default=1.7,
                   help="activations, CUDA graphs, non-torch memory (1.7: fits the baseline)")
    p.add_argument("--kv-gib", type=float, help="use this KV budget (from vLLM's log) instead of the estimate")
    p.add_argument("--block-size", type=int, default=16)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter-dir", help="plan for the adapters in this directory")
    src.add_argument("--adapters", type=int, default=1000, help="number of adapters of the rank mix")
    p.add_argument("--ranks", default="8,16,32,64,128", help="rank mix: adapter j has ranks[j %% len]")
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj", help="modules of the rank-mix adapters")
    p.add_argument("--resident", default="1,8,32,128,512", help="resident adapter counts K to show")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("run", help="run ONE system over several traces on the GPU (one engine)")
    p.add_argument("--system", required=True, choices=("base", "stock", "plugin"))
    p.add_argument("--trace", action="append", default=[],
                   help="trace file, or spec such as 'n=100,requests=500'; repeatable; replaces "
                        "the default traces (one all-at-once trace per --n-adapters, plus --gamma)")
    p.add_argument("--n-adapters", help="adapter counts of the all-at-once traces, or 'none' "
                                        "(default: 0 for base, 1,100,1000 otherwise)")
    _workload_flags(p)
    p.add_argument("--gamma", default=DEFAULT_GAMMA,
                   help=f"the S-LoRA-style timed trace, or 'none' (default: {DEFAULT_GAMMA})")
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--work-dir", default="/dev/shm/slora-bench", help="model config and adapters go here")
    p.add_argument("--out-dir", default=results_dir)
    p.add_argument("--distinct", type=int, default=2, help="distinct random files per rank (the rest are hard links)")
    p.add_argument("--adapter-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--max-loras", type=int, default=128, help="stock: GPU slots")
    p.add_argument("--max-cpu-loras", type=int, help="stock: host cache (default: max(max_loras, largest N))")
    p.add_argument("--max-lora-rank", type=int, help="stock and plugin (default: the largest rank of the traces)")
    p.add_argument("--lora-target-modules", default="qkv_proj,o_proj",
                   help="stock: vLLM's lora_target_modules, or 'all' (vLLM's default: every layer)")
    p.add_argument("--slora-config", default="{}", help="plugin: extra JSON keys for additional_config['slora']")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LLM(...) argument (VALUE parsed as JSON when it is JSON); repeatable")
    p.add_argument("--slo-ttft-s", type=float, default=6.0, help="TTFT SLO for attainment (S-LoRA: 6 s)")
    p.add_argument("--deadline-s", type=float, default=480.0,
                   help="wall-clock budget of the whole command; the trace running then is cut, later ones skipped")
    p.add_argument("--profile", metavar="INDEX:START_S:DURATION_S",
                   help="run vLLM's torch profiler over one window of trace INDEX (0-based, in this "
                        "command's order), e.g. 0:15:5; that row is marked profiled (its throughput is "
                        "perturbed) and gets a GPU-time summary (see slora_plugin.bench.profile)")
    p.add_argument("--copy-gbps", type=float,
                   help="the GPU's measured device-to-device copy bandwidth (GB/s, read + write) for "
                        "the rows' roofline (default: the H100's 3005, kernels/NOTES.md)")
    p.add_argument("--peak-tflops", type=float,
                   help="the GPU's dense fp16 peak (TFLOP/s) for the roofline of prefill steps "
                        "(default: the H100 SXM's 989)")
    p.add_argument("--compress-rank", type=int, metavar="K",
                   help="plugin: serve the adapters from one compressed collection of rank K (their "
                        "random weight files compressed jointly; see slora_plugin.bench.compressed_fleet)")
    p.add_argument("--compress-clusters", type=int, default=1, help="with --compress-rank: clusters")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="markdown table and PNG plots from results files")
    p.add_argument("paths", nargs="*", help=f"results files or globs (default {results_dir}/throughput-*.json)")
    p.add_argument("--out-dir", default=results_dir)
    p.add_argument("--name", default="throughput", help="base name of the .md and .png files")
    p.set_defaults(func=_cmd_report, results_dir=results_dir)


def _workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--input-len", default="256", help="tokens, or a range lo-hi (uniform)")
    p.add_argument("--output-len", default="128", help="tokens, or a range lo-hi (uniform)")
    p.add_argument("--ranks", default="8,16,32,64,128", help="adapter j has rank ranks[j %% len]")
    p.add_argument("--alpha", type=float, default=1.0, help="popularity power law (1 = uniform)")
    p.add_argument("--seed", type=int, default=0)


def _base_spec(args: argparse.Namespace, n: int = 100) -> WorkloadSpec:
    text = (f"n={n},requests={args.requests},in={args.input_len},out={args.output_len},"
            f"ranks={args.ranks.replace(',', '/')},alpha={args.alpha},seed={args.seed}")
    return parse_spec(text)


def _cmd_trace(args: argparse.Namespace) -> int:
    try:
        spec = parse_spec(args.spec, _base_spec(args, args.n_adapters))
        trace = generate(spec)
    except WorkloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_trace(trace, args.out)
    counts = adapter_counts(trace.requests, spec.n_adapters)
    top = counts.max() / len(trace.requests) if spec.n_adapters else 0.0
    print(f"{args.out}: {spec.label}, {len(trace.requests)} requests, "
          f"{trace.distinct_adapters} distinct adapters (busiest: {100 * top:.1f}% of requests)")
    if spec.arrival == "gamma":
        rate, cv = gap_stats([r.arrival_s for r in trace.requests])
        print(f"  arrivals: {rate:.2f} req/s (spec {spec.rate:g}), cv {cv:.2f} (spec {spec.cv:g}), "
              f"last at {trace.requests[-1].arrival_s:.1f} s")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from slora_plugin.bench.plan import (
        PlanError, adapter_ranks_from_dir, format_plan, make_plan, ranks_from_mix)
    from slora_plugin.model_config import load_model_config

    try:
        cfg = load_model_config(args.model)
        if args.adapter_dir:
            adapters = adapter_ranks_from_dir(args.adapter_dir)
        else:
            adapters = ranks_from_mix(args.adapters, int_list(args.ranks, "--ranks"),
                                      [m for m in args.modules.split(",") if m])
        plan = make_plan(cfg, adapters, model_name=os.path.basename(args.model.rstrip("/")),
                         gpu_gib=args.gpu_gib, utilization=args.utilization,
                         overhead_gib=args.overhead_gib, kv_gib=args.kv_gib,
                         block_size=args.block_size, resident=int_list(args.resident, "--resident"))
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from slora_plugin.bench.profile import ProfileWindow
    from slora_plugin.bench.run import BenchError, RunOptions, command_line, run

    try:
        profile = ProfileWindow.parse(args.profile) if args.profile else None
        traces = _traces(args)
        opts = RunOptions(
            system=args.system, traces=traces, model=args.model, work_dir=args.work_dir,
            out_dir=args.out_dir, adapter_modules=tuple(m for m in args.adapter_modules.split(",") if m),
            distinct=args.distinct, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
            max_lora_rank=args.max_lora_rank,
            lora_target_modules=None if args.lora_target_modules == "all"
            else tuple(m for m in args.lora_target_modules.split(",") if m),
            slora_config=parse_json_object(args.slora_config, "--slora-config"),
            engine_args=dict(_engine_arg(a) for a in args.engine_arg),
            slo_ttft_s=args.slo_ttft_s, deadline_s=args.deadline_s, command=command_line(),
            profile=profile, compress_rank=args.compress_rank, compress_clusters=args.compress_clusters,
            **{k: v for k, v in (("copy_gbps", args.copy_gbps),
                                                  ("peak_tflops", args.peak_tflops)) if v})
    except (WorkloadError, BenchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(opts)
    return 0


def _traces(args: argparse.Namespace) -> list:
    base = _base_spec(args)
    if args.trace:
        return [load_trace(t) if os.path.isfile(t) else generate(parse_spec(t, base)) for t in args.trace]
    ns = args.n_adapters or ("0" if args.system == "base" else "1,100,1000")
    counts = [] if ns.lower() == "none" else int_list(ns, "--n-adapters", 0)
    traces = [generate(parse_spec(f"n={n},arrival=all", base)) for n in counts]
    if args.gamma.lower() != "none":
        traces.append(generate(parse_spec(args.gamma, base)))
    if not traces:
        raise ValueError("--n-adapters none with --gamma none: no traces to run")
    return traces


def _cmd_report(args: argparse.Namespace) -> int:
    from slora_plugin.bench.report import ReportError, load_results, markdown_table, write_report

    patterns = args.paths or [os.path.join(args.results_dir, "throughput-*.json")]
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or [pat])})
    try:
        out = write_report(paths, args.out_dir, args.name)
        print(markdown_table(load_results(paths)))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for what, path in out.items():
        print(f"{what}: {path}")
    return 0


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """Comma-separated integers of `flag`, each >= `minimum`; ValueError naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{flag}: expected integers >= {minimum}, got {text!r}")
    return values


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--engine-arg: expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
