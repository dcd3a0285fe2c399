"""Results files of the throughput harness without a GPU: request records, rows and the three
systems' files, shaped as `slora_plugin.bench.run` writes them (importable as `bench_results`
by the report tests and by the tests of the benchmarks/ scripts)."""

from __future__ import annotations

from slora_plugin.bench.report import summarize, write_results
from slora_plugin.bench.workload import WorkloadSpec


def fake_records(n=100, ttft_step=0.1, finished=None):
    return [{"index": i, "adapter": i % 7, "input_len": 256, "n_out": 128,
             "finished": True if finished is None else i < finished,
             "ttft_s": ttft_step * (i + 1), "e2e_s": ttft_step * (i + 1) + 2.0,
             "tpot_s": 0.01 + i * 1e-4} for i in range(n)]


def fake_row(system, n, out_tok, spec, ttft_step=0.1):
    m = summarize(fake_records(ttft_step=ttft_step), duration_s=1000 / out_tok * 12.8, slo_ttft_s=6.0)
    m["output_tok_per_s"] = out_tok
    return {"system": system, "trace": spec.label, "workload": spec.to_dict(),
            "n_adapters": 0 if system == "base" else n, "ranks": [] if system == "base" else [8, 16],
            **m, "truncated": False, "settings": {"max_loras": 128} if system == "stock" else {},
            "init_s": 80.0, "warmup_s": 2.0, "kv_cache_tokens": 116768, "gpu_mem_used_peak_mib": 74000,
            "preemptions": 0 if system == "base" else 3,
            **({"adapter_loads": n + 5, "adapter_evictions": n // 2, "pages_total": 7000,
                "adapter_pages_peak": 2500, "adapters_resident_peak": 120} if system == "plugin" else {})}


def fake_results(tmp_path):
    paths = []
    allq = WorkloadSpec(n_adapters=1000, arrival="all")
    gamma = WorkloadSpec(n_adapters=1000, arrival="gamma", rate=4, input_len=(8, 512), output_len=(8, 512))
    for system, rows in {
        "base": [fake_row("base", 0, 7270.7, WorkloadSpec(n_adapters=0, arrival="all")),
                 fake_row("base", 0, 900.0, WorkloadSpec(n_adapters=0, arrival="gamma", rate=4,
                                                         input_len=(8, 512), output_len=(8, 512)))],
        "stock": [fake_row("stock", n, t, WorkloadSpec(n_adapters=n, arrival="all"), 0.5)
                  for n, t in ((1, 5639.4), (100, 3656.6), (1000, 818.9))]
                 + [fake_row("stock", 1000, 500.0, gamma, 1.0)],
        "plugin": [fake_row("plugin", n, t, WorkloadSpec(n_adapters=n, arrival="all"))
                   for n, t in ((1, 6500.0), (100, 6000.0), (1000, 5000.0), (2000, 4800.0))],
    }.items():
        meta = {"date": "2026-11-23T00:00:00+00:00", "device": "NVIDIA H100 80GB HBM3 (81559 MiB)",
                "vllm_version": "0.26.0", "plugin_version": "0.1.0.dev0",
                "command": f"python benchmarks/throughput.py --system {system}",
                "workload": [allq.to_dict(), gamma.to_dict()]}
        paths.append(write_results(str(tmp_path / f"throughput-{system}-x.json"), meta, rows))
    return paths
