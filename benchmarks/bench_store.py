"""Host adapter store measurements (CPU here, and on the H100 host).

  1. index time for 10,000 adapters (configs + hard-linked weight files: nothing is read);
  2. disk (page cache) -> raw pinned host form, GB/s of adapter weights, for rank-16 (32 MiB
     fp16) and rank-128 (256 MiB) Llama-7B q,k,v,o adapters, one adapter at a time (latency)
     and with all loader threads busy;
  3. on a GPU: pinned raw host form -> the adapter's KV pages (H2D in runs of layers into two
     staging buffers + the Triton page writer: transpose, scale, scatter), GB/s, one load at a
     time and back to back, checked bit for bit against the reference writer; and a plain
     pinned -> GPU copy of the same bytes for comparison;
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
from slora_plugin.layout import ModelDims, PageLayout
from slora_plugin.raw_format import RawAdapter, raw_layout, record_bytes_bound

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


def bench_load(workdir: str, rank: int, repeats: int, threads: int) -> dict:
    """Loads of distinct adapters (hard links of one file: a real load each, page cache warm)."""
    dtype = torch.float16
    root = os.path.join(workdir, f"load-r{rank}")
    batch_n = 4 * threads
    names = synthesize(root, 1 + repeats + batch_n, [rank], LLAMA7B, TARGETS, distinct=1)
    store = AdapterStore(LLAMA7B, PAGE_ELEMS, dtype, adapter_dir=root, max_rank=128,
                         host_cache_bytes=2 * 2**30, loader_threads=threads)
    store.cache.buffer.fill_(0)  # resident, as pinned memory is (here: no first-touch page faults)
    spec = store.spec(names[0])
    layout = raw_layout(spec.layout, LLAMA7B.num_hidden_layers, dtype)
    nbytes = layout.data_bytes
    with open(spec.weights_file, "rb") as f:  # page cache warm: measure CPU work, not the disk
        f.read()
    lat = []
    for i in range(repeats):
        t0 = time.perf_counter()
        store.get(names[1 + i]).release()
        lat.append(time.perf_counter() - t0)
    batch = names[1 + repeats:]  # throughput with every loader thread busy
    t0 = time.perf_counter()
    store.prefetch(batch)
    for n in batch:
        store.get(n).release()
    par_s = time.perf_counter() - t0
    stats = store.stats()
    lease = store.get(names[0])
    gpu = bench_pages(lease.raw, spec.layout)
    lease.release()
    store.close()
    med = statistics.median(lat)
    return {"rank": rank, "adapter_bytes": nbytes, "raw_bytes": layout.nbytes,
            "num_pages": spec.num_pages, "waste_fraction": spec.layout.waste_fraction,
            "load_ms_median": med * 1e3, "load_ms_min": min(lat) * 1e3,
            "load_GBps_single": nbytes / med / 1e9, "load_GBps_parallel": len(batch) * nbytes / par_s / 1e9,
            "loader_threads": threads, "pinned": bool(stats["pinned"]), **gpu}


def bench_pages(raw: RawAdapter, layout: PageLayout) -> dict:
    """Pinned raw adapter -> pages of 32 layer pools at shuffled blocks, through the worker's
    PageLoader on a copy stream (the serving path)."""
    if not torch.cuda.is_available():
        return {"pages_GBps_single": None, "pages_GBps_stream": None, "h2d_GBps": None}
    from slora_plugin.kernels.page_writer import write_pages_ref
    from slora_plugin.worker.page_loader import PageLoader

    dtype, L = raw.layout.dtype, raw.layout.num_layers
    num_blocks = 2 * layout.num_pages + 8
    pools = [torch.zeros(num_blocks * PAGE_ELEMS, dtype=dtype, device="cuda") for _ in range(L)]
    blocks = torch.randperm(num_blocks)[:layout.num_pages].tolist()
    loader = PageLoader("cuda", record_bytes_bound(LLAMA7B, 128, dtype))
    copy = torch.cuda.Stream()
    with torch.cuda.stream(copy):
        loader.load(pools, raw, layout, blocks)  # compile
    copy.synchronize()
    ref = [torch.zeros(num_blocks * PAGE_ELEMS, dtype=dtype) for _ in range(L)]
    write_pages_ref(ref, raw.records(), raw.layout, layout, blocks)
    equal = all(torch.equal(p.cpu().view(torch.int16), r.view(torch.int16)) for p, r in zip(pools, ref))
    lat = []
    for _ in range(10):
        t0 = time.perf_counter()
        with torch.cuda.stream(copy):
            loader.load(pools, raw, layout, blocks)
        copy.synchronize()
        lat.append(time.perf_counter() - t0)
    n = 20
    t0 = time.perf_counter()
    with torch.cuda.stream(copy):
        for _ in range(n):
            loader.load(pools, raw, layout, blocks)
    copy.synchronize()
    stream_s = (time.perf_counter() - t0) / n
    dst = torch.empty(raw.buffer.shape, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(copy):
        dst.copy_(raw.buffer, non_blocking=True)
    copy.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(copy):
        for _ in range(n):
            dst.copy_(raw.buffer, non_blocking=True)
    copy.synchronize()
    h2d_s = (time.perf_counter() - t0) / n
    nbytes = raw.layout.data_bytes
    return {"pages_equal_reference": equal, "pages_ms_median": statistics.median(lat) * 1e3,
            "pages_GBps_single": nbytes / statistics.median(lat) / 1e9,
            "pages_GBps_stream": nbytes / stream_s / 1e9, "h2d_GBps": raw.buffer.numel() / h2d_s / 1e9}


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
        del idx["_root"], idx["_names"]
        load = [bench_load(work, rank, repeats, args.threads)
                for rank, repeats in ((16, args.repeats), (128, max(3, args.repeats // 4)))]
    device = torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu"
    result = {"device": device, "date": datetime.date.today().isoformat(),
              "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "index": idx, "load": load,
              "goals": {"index_s_10k": 2.0, "load_GBps": 4.0, "pages_GBps": 20.0},
              "stock_vllm_load_GBps": "0.45-1 (docs/shared baseline notes)"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"store-{device}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| measure | value | goal |\n|---|---|---|")
    print(f"| index {idx['adapters']} adapters | {idx['index_s']:.3f} s | < 2 s |")
    print(f"| host bytes per indexed adapter | {idx['host_bytes_per_indexed_adapter']:.0f} B | - |")
    for ld in load:
        what = f"r{ld['rank']} 7B qkvo ({ld['adapter_bytes'] / 2**20:.0f} MiB)"
        print(f"| disk -> raw pinned, {what}, one at a time | {ld['load_GBps_single']:.2f} GB/s "
              f"({ld['load_ms_median']:.1f} ms) | >= 4 GB/s |")
        print(f"| disk -> raw pinned, {what}, {ld['loader_threads']} loader threads | "
              f"{ld['load_GBps_parallel']:.2f} GB/s | >= 4 GB/s |")
        if ld["pages_GBps_single"] is None:
            print(f"| pinned raw -> GPU pages, {what} | skipped (no GPU) | >= 20 GB/s |")
            continue
        print(f"| pinned raw -> GPU pages, {what}, one load | {ld['pages_GBps_single']:.1f} GB/s "
              f"({ld['pages_ms_median']:.2f} ms), equal to reference: {ld['pages_equal_reference']} | >= 20 GB/s |")
        print(f"| pinned raw -> GPU pages, {what}, back to back | {ld['pages_GBps_stream']:.1f} GB/s | >= 20 GB/s |")
        print(f"| plain pinned -> GPU copy, same bytes | {ld['h2d_GBps']:.1f} GB/s | - |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
