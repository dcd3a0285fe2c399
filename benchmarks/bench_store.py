"""Host adapter store measurements (CPU here, and on the H100 host).

  1. index time for 10,000 adapters (configs + hard-linked weight files: nothing is read);
  2. disk (page cache) -> packed host pages, GB/s, for a rank-16 Llama-7B q,k,v,o adapter
     (32 MiB fp16), one adapter at a time (latency) and with all loader threads busy;
  3. pinned host -> GPU copy, GB/s (skipped without a GPU);
  4. host memory per indexed adapter (tracemalloc over the index and the id table).
Writes benchmarks/results/store-<device>-<date>.json and prints a markdown table.

    python benchmarks/bench_store.py [--adapters 10000] [--repeats 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc

import torch

from slora_plugin.adapters import AdapterStore
from slora_plugin.adapters.cli import synthesize
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.layout import ModelDims

LLAMA7B = ModelDims(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                    intermediate_size=11008, num_hidden_layers=32)
#: vLLM's default block of 16 tokens: K and V of 32 heads x 128 dims, in elements.
PAGE_ELEMS = 2 * 16 * 32 * 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def bench_index(workdir: str, count: int) -> dict:
    root = os.path.join(workdir, "fleet")
    t0 = time.perf_counter()
    synthesize(root, count, [16], LLAMA7B, TARGETS, distinct=1, progress=True)
    synth_s = time.perf_counter() - t0
    os.system("sync")
    t0 = time.perf_counter()
    names = AdapterIndex(root).scan()
    index_s = time.perf_counter() - t0
    assert len(names) == count
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    index = AdapterIndex(root)
    index.scan()
    t0 = time.perf_counter()
    for n in names:  # every name asked for once: the id table is full
        index.ids.get(n)
    ids_s = time.perf_counter() - t0
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    return {"adapters": count, "synth_s": synth_s, "index_s": index_s, "assign_all_ids_s": ids_s,
            "host_bytes_per_indexed_adapter": used / count, "_root": root, "_names": names}


def bench_load(root: str, names: list[str], repeats: int, threads: int) -> dict:
    dtype = torch.float16
    store = AdapterStore(LLAMA7B, PAGE_ELEMS, dtype, adapter_dir=root, max_rank=64,
                         host_cache_bytes=2 * 2**30, loader_threads=threads)
    spec = store.spec(names[0])
    nbytes = spec.num_pages * PAGE_ELEMS * 2 * LLAMA7B.num_hidden_layers
    with open(spec.weights_file, "rb") as f:  # page cache warm: measure CPU work, not the disk
        f.read()
    lat = []
    for i in range(repeats):
        t0 = time.perf_counter()
        store.get(names[1 + i]).release()  # distinct adapters (hard links): each one a real load
        lat.append(time.perf_counter() - t0)
    # throughput with every loader thread busy
    batch = names[1 + repeats:1 + repeats + 4 * threads]
    t0 = time.perf_counter()
    store.prefetch(batch)
    for n in batch:
        store.get(n).release()
    par_s = time.perf_counter() - t0
    stats = store.stats()
    pages = store.get(names[0])
    h2d = bench_h2d(pages.pages)
    pages.release()
    store.close()
    med = statistics.median(lat)
    return {"adapter_bytes_packed": nbytes, "num_pages": spec.num_pages, "waste_fraction": spec.layout.waste_fraction,
            "load_ms_median": med * 1e3, "load_ms_min": min(lat) * 1e3,
            "load_GBps_single": nbytes / med / 1e9, "load_GBps_parallel": len(batch) * nbytes / par_s / 1e9,
            "loader_threads": threads, "pinned": bool(stats["pinned"]), **h2d}


def bench_h2d(pages: torch.Tensor) -> dict:
    if not torch.cuda.is_available():
        return {"h2d_GBps": None}
    dst = torch.empty(pages.shape, dtype=pages.dtype, device="cuda")
    stream = torch.cuda.Stream()
    for _ in range(3):
        with torch.cuda.stream(stream):
            dst.copy_(pages, non_blocking=True)
    stream.synchronize()
    n, t0 = 50, time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(n):
            dst.copy_(pages, non_blocking=True)
    stream.synchronize()
    dt = (time.perf_counter() - t0) / n
    return {"h2d_GBps": pages.numel() * pages.element_size() / dt / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        idx = bench_index(work, args.adapters)
        load = bench_load(idx.pop("_root"), idx.pop("_names"), args.repeats, args.threads)
    device = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
    result = {"device": device, "date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "index": idx, "load": load,
              "goals": {"index_s_10k": 2.0, "load_GBps": 4.0, "h2d_GBps": 20.0},
              "stock_vllm_load_GBps": "0.45-1 (docs/shared baseline notes)"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"store-{device}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    h2d = "skipped (no GPU)" if load["h2d_GBps"] is None else f"{load['h2d_GBps']:.1f} GB/s"
    print("\n| measure | value | goal |\n|---|---|---|")
    print(f"| index {idx['adapters']} adapters | {idx['index_s']:.3f} s | < 2 s |")
    print(f"| host bytes per indexed adapter | {idx['host_bytes_per_indexed_adapter']:.0f} B | - |")
    print(f"| load+pack r16 7B qkvo ({load['adapter_bytes_packed'] / 2**20:.0f} MiB), one at a time | "
          f"{load['load_GBps_single']:.2f} GB/s ({load['load_ms_median']:.1f} ms) | >= 4 GB/s |")
    print(f"| load+pack, {load['loader_threads']} loader threads | {load['load_GBps_parallel']:.2f} GB/s | >= 4 GB/s |")
    print(f"| pinned host -> GPU | {h2d} | >= 20 GB/s |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
