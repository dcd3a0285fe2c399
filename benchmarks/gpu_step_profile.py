"""Where a decode step's time goes: the plugin against the base model at fixed batches (H100).

The throughput runs measured whole traces, where loads, admission and KV pressure mix with the
cost of a step. This script holds everything else fixed: B requests, all admitted at once, their
adapters already resident (loaded by a warm-up pass), 32 prompt tokens, `ignore_eos`. The decode
time per step is the difference of two runs that differ only in max_tokens (16 and 144), divided
by the 128 extra steps, so prefill, start and finish cancel out.

Cases, each B in --batches:
  base       the base model (its own engine, --system base);
  none       plugin engine, requests without an adapter (LoRA layers run and exit early);
  one        plugin engine, every request on the same rank-16 adapter;
  distinct   plugin engine, every request on its own adapter, ranks 8/16/32/64 in turn.
With --profile, one more `distinct` pass under torch.profiler (in-process engine) writes the top
CUDA kernels and CPU ops of a few steps to a text file.

    python benchmarks/gpu_step_profile.py --system plugin --adapters /dev/shm/prof --out R.json --profile P.txt
    python benchmarks/gpu_step_profile.py --system base --out R.json
Rows are appended to the JSON file (one object with date, device and rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_CONFIG_DIR = os.path.join(HERE, "configs", "llama-2-7b")
RANKS = (8, 16, 32, 64)
SHORT, LONG = 16, 144
PROMPT = 32


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(PROMPT)]} for _ in range(n)]


def timed(llm, n: int, max_tokens: int, loras, seed: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts(n, seed), params, lora_request=loras, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return dt


def step_ms(llm, n: int, loras, seed: int) -> dict:
    """Per-step decode time from two runs (SHORT and LONG output tokens)."""
    short = timed(llm, n, SHORT, loras, seed)
    long = timed(llm, n, LONG, loras, seed + 1)
    return {"short_s": round(short, 4), "long_s": round(long, 4),
            "step_ms": round(1e3 * (long - short) / (LONG - SHORT), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("base", "plugin"), required=True)
    ap.add_argument("--adapters", default="/dev/shm/slora-step-profile", help="adapter work dir (plugin)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--target-modules", default=None,
                    help="slora.target_modules, comma-separated (default: the plugin's default)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", help="text file for the torch.profiler tables (plugin only)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the profiler must see the worker

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=LLAMA2_CONFIG_DIR, load_format="dummy", skip_tokenizer_init=True, dtype="float16",
                  max_model_len=1024, gpu_memory_utilization=0.9, seed=0, max_num_seqs=max(batches))
    rows: list[dict] = []
    if args.system == "plugin":
        from slora_plugin.bench.run import adapter_name, prepare_adapters
        from slora_plugin.model_config import load_model_config

        n = max(batches)
        plan = {g: (RANKS[g % len(RANKS)], g // len(RANKS)) for g in range(n)}
        plan[n] = (16, 0)  # the shared adapter of the "one" case
        adir = prepare_adapters(args.adapters, plan, load_model_config(LLAMA2_CONFIG_DIR),
                                ("q_proj", "k_proj", "v_proj", "o_proj"), distinct=8)
        slora = {"adapter_dir": adir, "max_lora_rank": 64, "max_adapters_per_step": max(256, n)}
        if args.target_modules:
            slora["target_modules"] = args.target_modules.split(",")
        kwargs["additional_config"] = {"slora": slora}
        lr = {g: LoRARequest(adapter_name(g), g + 1, os.path.join(adir, adapter_name(g))) for g in plan}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - t0
    print(f"[profile] engine up in {init_s:.1f} s", flush=True)
    timed(llm, 8, 4, None, 99)  # first generate compiles/warms what capture did not
    for b in batches:
        cases = {"base": None} if args.system == "base" else {
            "none": None, "one": [lr[max(plan)]] * b, "distinct": [lr[g] for g in range(b)]}
        for case, loras in cases.items():
            if loras is not None:
                timed(llm, b, 1, loras, 7)  # load the adapters before timing
            row = {"system": args.system, "case": case, "batch": b, **step_ms(llm, b, loras, 11)}
            print(f"[profile] {row}", flush=True)
            rows.append(row)
    if args.profile and args.system == "plugin":
        import torch
        from torch.profiler import ProfilerActivity, profile

        b = max(batches)
        loras = [lr[g] for g in range(b)]
        timed(llm, b, 1, loras, 7)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed(llm, b, 24, loras, 13)
        ka = prof.key_averages()
        with open(args.profile, "w") as f:
            f.write(f"plugin, batch {b} distinct adapters (ranks {RANKS}), 24 output tokens\n\n")
            f.write(ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
            f.write("\n\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
        print(f"[profile] wrote {args.profile}", flush=True)
    import torch

    doc = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0), "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    doc["rows"] += [dict(r, init_s=round(init_s, 1)) for r in rows]
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"[profile] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
