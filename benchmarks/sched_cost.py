"""CPU cost of one scheduler step with a long waiting queue: the plugin's schedulers against
vLLM's stock Scheduler on the same requests (CPU only, no GPU, no model).

Why: the plugin's scheduler runs Python over the waiting queue every engine step (the failed-load
check, admission by host readiness, putting hidden requests back). In the throughput benchmark
1,000 requests arrive at once, so that queue is 700-1,000 long for most of the run; this script
measures what that costs per step.

What runs: vLLM 0.26's real AsyncScheduler (the default) built as the CPU tests build it
(tests/vllm_cpu.py; this script puts tests/ on sys.path to import it), fed 1,000 requests of 256
prompt / 128 output tokens, stepped as the async engine steps it (schedule step N+1, then process
step N's fake output). A step's time is `schedule()` + `update_from_output()`. Systems:

- `stock`: vLLM's AsyncScheduler, LoRA off, the requests without adapters (the base line);
- `stock-lora`: vLLM's AsyncScheduler, LoRA on (max_loras 128), the requests with adapters: vLLM's
  own per-step work for LoRA requests (its max_loras check skips over the queue), which the plugin
  inherits (it sets max_loras to max_adapters_per_step, 128);
- `plugin`: SLoRAAsyncScheduler with a readiness oracle, the real host store (`AdapterStore`)
  over tiny adapters on disk, all loaded before the clock starts: the path with
  `slora.admission_by_host_readiness` on (the worker sharing the scheduler's process);
- `plugin-no-oracle`: SLoRAAsyncScheduler without an oracle (prefetch hints instead): the
  default since admission by host readiness became opt-in.

Pool states: `full` is the H100 benchmark's engine (7,298 KV blocks of 16 tokens, max_num_seqs
1,024, 16,384 batched tokens). `partly-full`: 40,000 blocks, max_num_seqs 256: the sequence cap
limits admission and most pages stay free. With 1,000 adapters the max_loras ceiling (128
distinct adapters a step) keeps ~128 requests running and ~870 waiting in both; stock without
LoRA admits ~430 requests at once in `full`, so its few long-queue steps are prefill steps: the
like-for-like comparison is `plugin` against `stock-lora` (same running and waiting), and the
plugin's own cost is its "outside vLLM" time (below).

    /work/venv/bin/python benchmarks/sched_cost.py --label after   # ~2-3 minutes on 2 CPU cores

Writes results/sched-cost-cpu-DATE.json (or --out; `--append` adds the run to that file's runs).
"outside vLLM" is a step's time not spent inside vLLM's own `schedule` / `update_from_output`:
the plugin's own per-step work (its hooks that vLLM calls from inside, allocate_slots and free,
count as vLLM's). Times are the main thread's CPU time (`time.thread_time`), so that other
jobs on the machine do not inflate them; they still vary by some 10-30% between runs: compare
systems within one run. The "before" run of the recorded file imported the previous
`slora_plugin/pool/{admission,scheduler}.py` through PYTHONPATH (a copy of the package).
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
from types import SimpleNamespace
from typing import Any, Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")

PROMPT, OUTPUT, REQUESTS = 256, 128, 1000
MAX_LORAS = 128  # the plugin's max_adapters_per_step default, and the stock baseline's tuning
RANKS = (8, 16, 32, 64, 128)  # adapter j has rank RANKS[j % 5], as in the throughput benchmark
POOLS = {
    "full": dict(num_blocks=7298, max_num_seqs=1024, max_num_batched_tokens=16384),
    "partly-full": dict(num_blocks=40000, max_num_seqs=256, max_num_batched_tokens=16384),
}
SYSTEMS = ("stock", "stock-lora", "plugin", "plugin-no-oracle")
#: A step counts as "long queue" when at least this many requests wait.
LONG_QUEUE = 700


def adapter_pages(lora_id: int) -> int:
    """KV pages of adapter `lora_id` at Llama-2-7B scale (q,k,v,o; about rank/4 pages)."""
    return RANKS[lora_id % len(RANKS)] // 4


def write_adapters(root: str, n: int, dims: Any) -> list[str]:
    from slora_plugin.adapters.peft_format import write_random_adapter

    return [write_random_adapter(os.path.join(root, f"a{j}"), dims, 8, ["q_proj", "v_proj"], seed=j)
            for j in range(n)]


def loaded_store(root: str, paths: list[str], dims: Any) -> Any:
    """The real host store with every adapter in pinned memory (steady state of a long run)."""
    import torch

    from slora_plugin.adapters import AdapterStore

    store = AdapterStore(dims, 1024, torch.float16, adapter_dir=root, max_rank=16,
                         host_cache_bytes=1 << 30, loader_threads=2)
    for p in paths:
        store.start(p)
    deadline = time.monotonic() + 120
    while not all(store.ready(p) for p in paths):
        if time.monotonic() > deadline:
            raise RuntimeError("the host store did not load the adapters within 120 s")
        time.sleep(0.05)
    return store


def timed_classes() -> dict[str, type]:
    """Scheduler classes that add up the time spent in vLLM's own `schedule` and
    `update_from_output` (`self.vllm_s`): a step's time minus that is the plugin's own work.
    The plugin's hooks that vLLM calls from inside (allocate_slots, free) count as vLLM's."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from slora_plugin.pool.scheduler import _SLoRAScheduling

    class TimedVLLM(AsyncScheduler):
        vllm_s = 0.0

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return super().schedule(*args, **kwargs)
            finally:
                self.vllm_s += time.thread_time() - t0

        def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return super().update_from_output(*args, **kwargs)
            finally:
                self.vllm_s += time.thread_time() - t0

    # the plugin's mixin in front of the timed vLLM class, as SLoRAAsyncScheduler is built
    plugin = type("TimedSLoRAAsyncScheduler", (_SLoRAScheduling, TimedVLLM), {})
    return {"stock": TimedVLLM, "plugin": plugin}


def build(system: str, pool: str, model_dir: str, store: Any) -> Any:
    from vllm_cpu import build_vllm_config, create_scheduler

    p = POOLS[pool]
    cfg = build_vllm_config(model_dir, block_size=16, max_num_seqs=p["max_num_seqs"],
                            max_num_batched_tokens=p["max_num_batched_tokens"],
                            max_model_len=1024, async_scheduling=True,
                            max_loras=None if system == "stock" else MAX_LORAS)
    classes = timed_classes()
    if system.startswith("stock"):
        return create_scheduler(vllm_config=cfg, num_blocks=p["num_blocks"],
                                scheduler_cls=classes["stock"])
    kwargs: dict[str, Any] = {"pages_of": lambda lr: (adapter_pages(lr.lora_int_id),
                                                      f"content-{lr.lora_int_id}")}
    if system == "plugin":
        kwargs["host_readiness"] = store
    cfg.additional_config["slora"] = {}
    return create_scheduler(vllm_config=cfg, num_blocks=p["num_blocks"],
                            scheduler_cls=classes["plugin"], scheduler_kwargs=kwargs)


def _clocked(fn: Callable, clock: list[float]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.thread_time() - t0
    return wrapper


def run_one(system: str, pool: str, n_adapters: int, model_dir: str, paths: list[str],
            store: Any, max_steps: int) -> dict[str, Any]:
    """Step one scheduler through the 1,000 requests (or `max_steps`); per-step times."""
    from vllm_cpu import engine_loop, lora, make_request

    sched = build(system, pool, model_dir, store)
    for i in range(REQUESTS):
        j = i % n_adapters
        lr = None if system == "stock" else lora(j + 1, name=f"a{j}", path=paths[j])
        sched.add_request(make_request(PROMPT, OUTPUT, lora_request=lr, request_id=f"r{i}",
                                       prompt_token_ids=[3 + (7 * i + k) % 200 for k in range(PROMPT)]))
    clock = [0.0]  # time inside the scheduler's public schedule / update_from_output
    for name in ("schedule", "update_from_output"):
        setattr(sched, name, _clocked(getattr(sched, name), clock))
    loop = engine_loop(sched)
    steps = []  # (waiting, running, step s, of which outside vLLM's own methods s)
    for _ in range(max_steps):
        if not sched.has_requests() and not loop.in_flight:
            break
        waiting = len(sched.waiting) + len(sched.skipped_waiting)
        running = len(sched.running)
        vllm0, total0 = sched.vllm_s, clock[0]
        loop.step()
        total = clock[0] - total0
        steps.append((waiting, running, total, total - (sched.vllm_s - vllm0)))
    long = [s for s in steps if s[0] >= LONG_QUEUE]

    def ms(values: list[float], how: Callable = statistics.median) -> float | None:
        return round(1e3 * how(values), 3) if values else None

    out: dict[str, Any] = {
        "steps": len(steps),
        "finished": not sched.has_requests(),
        "long_queue_steps": len(long),
        "ms_per_step_long_queue_median": ms([s[2] for s in long]),
        "ms_outside_vllm_long_queue_median": ms([s[3] for s in long]),
        "ms_per_step_all_mean": ms([s[2] for s in steps], statistics.fmean),
        "ms_outside_vllm_all_mean": ms([s[3] for s in steps], statistics.fmean),
        "waiting_median_long_queue": statistics.median(s[0] for s in long) if long else None,
        "running_median_long_queue": statistics.median(s[1] for s in long) if long else None,
    }
    if hasattr(sched, "pool_stats"):
        stats = sched.pool_stats()
        out["pool_stats"] = {k: stats[k] for k in ("pages_total", "pages_free", "adapter_loads",
                                             "adapter_evictions", "admission_holds")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", default="1000,100", help="adapter counts, comma-separated")
    ap.add_argument("--pools", default=",".join(POOLS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--max-steps", type=int, default=300,
                    help="steps per run (the long-queue regime is the first few hundred)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. before / after)")
    ap.add_argument("--out", help="JSON path (default results/sched-cost-cpu-DATE.json)")
    ap.add_argument("--append", action="store_true",
                    help="add this run to the runs of an existing --out file")
    args = ap.parse_args(argv)

    sys.path.insert(0, TESTS)  # tests/vllm_cpu.py and tests/tiny_model.py
    from tiny_model import TINY_LLAMA, write_model_config

    from slora_plugin.layout import ModelDims

    dims = ModelDims.from_hf_config(SimpleNamespace(**TINY_LLAMA))
    counts = [int(x) for x in args.adapters.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_config(os.path.join(tmp, "model"), {"max_position_embeddings": 1024})
        paths = write_adapters(os.path.join(tmp, "adapters"), max(counts), dims)
        store = loaded_store(os.path.join(tmp, "adapters"), paths, dims)
        try:
            for pool in args.pools.split(","):
                for n in counts:
                    for system in args.systems.split(","):
                        reps = [run_one(system, pool, n, model_dir, paths, store, args.max_steps)
                                for _ in range(args.repeats)]
                        key = "ms_outside_vllm_long_queue_median"
                        med = sorted(reps, key=lambda r: r[key] or 0)
                        row = {"pool": pool, "adapters": n, "system": system,
                               **med[len(med) // 2],
                               "repeats_outside_vllm_long_queue_median_ms": [r[key] for r in reps]}
                        rows.append(row)
                        print(f"{pool:12s} {n:5d} adapters {system:17s} "
                              f"step {row['ms_per_step_long_queue_median']} ms, "
                              f"outside vLLM {row[key]} ms (median of "
                              f"{row['long_queue_steps']} steps with >= {LONG_QUEUE} waiting; "
                              f"{row['running_median_long_queue']} running); all steps: "
                              f"{row['ms_per_step_all_mean']} / {row['ms_outside_vllm_all_mean']} ms",
                              flush=True)
        finally:
            store.close()
    import slora_plugin

    run = {"label": args.label, "date": datetime.date.today().isoformat(),
           "slora_plugin": os.path.dirname(slora_plugin.__file__), "rows": rows}
    out = args.out or os.path.join(RESULTS, f"sched-cost-cpu-{run['date']}.json")
    result = {
        "what": "CPU ms (main thread's CPU time) per scheduler step (schedule + "
                "update_from_output; 'outside vLLM': the "
                "part not spent inside vLLM's own schedule / update_from_output, i.e. the "
                f"plugin's work), {REQUESTS} requests of {PROMPT} in / {OUTPUT} out submitted at "
                "once, async scheduler, tiny model config; medians over the steps that start "
                f"with >= {LONG_QUEUE} waiting requests, median run of the repeats",
        "machine": "this 2-core CPU development machine (no GPU), shared with other jobs: "
                   f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "pools": POOLS,
        "runs": [],
    }
    if args.append and os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    result["runs"].append(run)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
