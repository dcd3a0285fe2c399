"""The compressed-collection op against the paged LoRA op, per fused layer of Llama-3-8B (GPU).

    python benchmarks/bench_compressed.py [--out-dir benchmarks/results] [--rep-ms 25]
    python benchmarks/bench_compressed.py --tokens 2048,8192 --distinct 16,128 --ranks-k 128 \
        --clusters 1 --tag prefill                # prefill-sized steps (compress-kernels-prefill-...)
    python benchmarks/bench_compressed.py --tiny     # CPU smoke run (interpreter, tiny shapes)

Why: compression pays off in serving only if a step with many distinct adapters costs about what
it costs with one. This measures, for qkv_proj (4096 -> 4096 + 2 x 1024) and gate_up_proj
(4096 -> 2 x 14336), decode batches of 16..512 tokens over 1..256 distinct adapters:
  - `paged`: `paged_lora_linear` on rank-16 adapters (what the plugin serves uncompressed);
  - `compressed`: `compressed_lora_linear` at K = 32 and 64, 1 and 4 clusters (two GEMMs on
    shared bases and the per-token core product).
Times: `triton.testing.do_bench` median of a CUDA-graph replay of one call (`SegmentMeta.update`,
once per step for all layers, is not in it). Bytes that must move at least once: x, y, and the
weights (paged: every distinct adapter's A and B rows; compressed: every cluster's bases once
plus every distinct adapter's cores). Writes compress-kernels-<date>.json (with --tag T:
compress-kernels-T-<date>.json) and a markdown table. The prefill sizes ask why a step admitting
~128 compressed adapters (thousands of prompt tokens) ran 1-1.9 s on the H100 (2026-12-06).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Callable

import torch

from slora_plugin.bench.cli import int_list

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

#: (name, modules, d_in, slice widths) of Llama-3-8B's fused layers, and the tiny model's for --tiny.
LAYERS = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), 4096, (4096, 1024, 1024)),
          "gate_up_proj": (("gate_proj", "up_proj"), 4096, (14336, 14336))}
TINY_LAYERS = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), 64, (64, 32, 32))}
TOKENS, DISTINCT, RANKS_K, CLUSTERS = (16, 64, 256, 512), (1, 16, 64, 256), (32, 64), (1, 4)
PAGE_ELEMS = 2 * 16 * 8 * 128  # Llama-3-8B fp16 KV page of one layer, block size 16
LORA_RANK = 16


def timer(device: torch.device, rep_ms: int) -> Callable[[Callable[[], None]], float]:
    """us per call: CUDA-graph replay under do_bench on a GPU, wall clock on the CPU (smoke only)."""
    if device.type != "cuda":
        def cpu(fn: Callable[[], None]) -> float:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        return cpu
    import triton.testing

    def gpu(fn: Callable[[], None]) -> float:
        fn()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
        return 1e3 * triton.testing.do_bench(graph.replay, warmup=5, rep=rep_ms, return_mode="median")
    return gpu


def run(layers: dict, tokens: tuple[int, ...], distinct: tuple[int, ...], ranks_k: tuple[int, ...],
        clusters: tuple[int, ...], page_elems: int, dtype: torch.dtype, device: torch.device,
        rep_ms: int) -> list[dict]:
    from slora_plugin.kernels.compressed_lora import CompressedWorkspace, compressed_lora_linear
    from fixture_loader import load_test_module
    from slora_plugin.kernels.lora_linear import paged_lora_linear
    from slora_plugin.kernels.metadata import SegmentMeta

    build_synthetic_cores = load_test_module("compress/synthetic_cores.py").build_synthetic_cores
    build_synthetic_pool = load_test_module("kernels/synthetic_pool.py").build_synthetic_pool
    from slora_plugin.layout import MODULES

    timed = timer(device, rep_ms)
    isz = torch.empty((), dtype=dtype).element_size()
    max_slots = max(distinct)
    meta = SegmentMeta(max_tokens=max(tokens), max_slots=max_slots, device=device)
    rows = []
    for layer, (mods, d_in, widths) in layers.items():
        io = {m: (d_in, w) for m, w in zip(mods, widths)}
        ids = [MODULES.index(m) for m in mods]
        gen = torch.Generator(device=device).manual_seed(0)
        sp = build_synthetic_pool(_dims_for(io), [{m: LORA_RANK for m in mods}] * max_slots,
                                  max(page_elems, max(widths), d_in), dtype, device, LORA_RANK, gen)
        compressed = {}
        for k in ranks_k:
            for c in clusters:
                sc = build_synthetic_cores(io, [list(mods)] * max_slots, [s % c for s in range(max_slots)], c, k,
                                           False, max(page_elems, k), dtype, device, torch.Generator().manual_seed(1))
                compressed[(k, c)] = sc
        for t in tokens:
            x = (torch.randn(t, d_in, device=device) / 4).to(dtype)
            y = torch.zeros(t, sum(widths), dtype=dtype, device=device)
            for n in distinct:
                if n > t:
                    continue
                slots = (torch.arange(t) % n).to(torch.int32).to(device)
                meta.update(slots)
                xy = (x.numel() + y.numel()) * isz
                us = timed(lambda: paged_lora_linear(y, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks, sp.scales,
                                                     tuple(ids), tuple(widths), LORA_RANK))
                paged_bytes = xy + n * LORA_RANK * sum(d_in + w for w in widths) * isz
                rows.append(_row(layer, "paged", t, n, LORA_RANK, None, us, paged_bytes))
                for (k, c), sc in compressed.items():
                    bases = [sc.bases[m] for m in mods]
                    ws = CompressedWorkspace(t, k * c, dtype, device)
                    us = timed(lambda: compressed_lora_linear(y, x, sc.pool, meta, sc.core_addr, sc.has_core,
                                                              sc.slot_group, bases, ids, widths, False, ws))
                    used = min(n, c)  # clusters whose bases the step reads
                    comp_bytes = xy + (used * k * sum(d_in + w for w in widths) + n * len(mods) * k * k) * isz
                    rows.append(_row(layer, "compressed", t, n, k, c, us, comp_bytes))
                print(f"{layer} tokens={t} distinct={n}: " + ", ".join(
                    f"{r['op']} K={r['rank']} C={r['clusters']} {r['time_us']:.1f} us"
                    for r in rows[-1 - len(compressed):]), file=sys.stderr)
    return rows


def _dims_for(io: dict[str, tuple[int, int]]):
    """A ModelDims whose module_io gives `io` for the benchmarked modules (build_synthetic_pool
    lays adapters out through the real layout, which asks the dims); heads of 16 so that any
    q / kv width works."""
    from slora_plugin.layout import ModelDims

    d_in = next(iter(io.values()))[0]
    q, kv = io.get("q_proj", (d_in, d_in))[1], io.get("k_proj", (d_in, d_in))[1]
    inter = io.get("gate_proj", (d_in, d_in))[1]
    return ModelDims(hidden_size=d_in, num_attention_heads=q // 16, num_key_value_heads=kv // 16, head_dim=16,
                     intermediate_size=inter, num_hidden_layers=1)


def _row(layer: str, op: str, tokens: int, distinct: int, rank: int, clusters: int | None, us: float,
         nbytes: int) -> dict:
    return {"layer": layer, "op": op, "tokens": tokens, "distinct_adapters": distinct, "rank": rank,
            "clusters": clusters, "time_us": round(us, 2), "bytes": nbytes,
            "gbps": round(nbytes / (us * 1e-6) / 1e9, 1)}


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | tokens | distinct | op | K / r | clusters | us | GB/s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['distinct_adapters']} | {r['op']} | {r['rank']} | "
                     f"{r['clusters'] or ''} | {r['time_us']} | {r['gbps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--rep-ms", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (Triton interpreter): a smoke run")
    p.add_argument("--tokens", help=f"tokens a step (default {_csv(TOKENS)}; --tiny: 4,17)")
    p.add_argument("--distinct", help=f"distinct adapters a step (default {_csv(DISTINCT)}; --tiny: 1,3)")
    p.add_argument("--ranks-k", help=f"compressed ranks K (default {_csv(RANKS_K)}; --tiny: 8)")
    p.add_argument("--clusters", help=f"clusters (default {_csv(CLUSTERS)}; --tiny: 1,2)")
    p.add_argument("--tag", help="names the results file compress-kernels-TAG-<date>.json")
    args = p.parse_args(argv)
    for flag in ("tokens", "distinct", "ranks_k", "clusters"):
        text = getattr(args, flag)
        try:
            setattr(args, flag, tuple(int_list(text, "--" + flag.replace("_", "-"))) if text else None)
        except ValueError as e:
            p.error(str(e))
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sizes = (args.tokens or (4, 17), args.distinct or (1, 3), args.ranks_k or (8,), args.clusters or (1, 2))
        rows = run(TINY_LAYERS, *sizes, 512, torch.float16, torch.device("cpu"), 1)
        device_name = "cpu (smoke)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --tiny for a CPU smoke run)")
        sizes = (args.tokens or TOKENS, args.distinct or DISTINCT, args.ranks_k or RANKS_K, args.clusters or CLUSTERS)
        rows = run(LAYERS, *sizes, PAGE_ELEMS, torch.float16, torch.device("cuda"), args.rep_ms)
        device_name = torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    os.makedirs(args.out_dir, exist_ok=True)
    name = f"compress-kernels-{args.tag}-{date}.json" if args.tag else f"compress-kernels-{date}.json"
    path = os.path.join(args.out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"date": date, "device": device_name, "lora_rank": LORA_RANK, "rows": rows}, f, indent=1)
    print(markdown(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
