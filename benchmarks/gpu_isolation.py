"""1,000 distinct adapters on a Llama-2-7B-shaped model: isolation and pool accounting (H100).

Every adapter has its own random weights (o_proj only, ranks 1-8, so 1,000 distinct files fit on
disk and in memory), and the KV cache is capped so that adapters must be evicted and reloaded
while requests run. Two passes over the same requests:

- mixed: all requests in one `generate` call (many adapters per step, loads and evictions);
- solo: a sample of requests, each alone in its own call (its adapter loaded fresh).

A request that read another adapter's pages, or stale pages, in the mixed pass would not repeat
its solo output. Dummy weights give flat logits, so batch-size-dependent rounding can flip a
near-tie; the script therefore also records the log-probability difference along the common
prefix and how often adapters change the output at all (without that, equality proves nothing).
After the run the scheduler's pool must account for every block: free + adapter pages == all,
no KV pages held.

    python benchmarks/gpu_isolation.py --adapters /dev/shm/iso --out benchmarks/results/isolation-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_CONFIG_DIR = os.path.join(HERE, "configs", "llama-2-7b")


def write_adapters(directory: str, count: int, seed: int, std: float) -> list[tuple[str, int]]:
    """`count` adapters with distinct random o_proj weights of standard deviation `std`;
    (name, rank) each. The directory is reused only if it was written with the same `std`."""
    import torch

    from slora_plugin.adapters.peft_format import adapter_config, random_weights, write_adapter
    from slora_plugin.model_config import load_model_dims

    dims = load_model_dims(LLAMA2_CONFIG_DIR)
    out = []
    g = torch.Generator().manual_seed(seed)
    for j in range(count):
        rank = 1 + j % 8
        name = f"iso-{j:04d}-r{rank}-s{std:g}"
        path = os.path.join(directory, name)
        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            tensors = random_weights(dims, {"o_proj": rank}, g, torch.float16, std)
            write_adapter(path, adapter_config(rank, 2 * rank, ["o_proj"]), tensors)
        out.append((name, rank))
    return out


def scheduler_of(llm):
    """The engine-core scheduler (in-process engine only)."""
    core = llm.llm_engine.engine_core
    return core.engine_core.scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--solo", type=int, default=48, help="requests re-run alone")
    ap.add_argument("--blocks", type=int, default=1200, help="KV blocks (num_gpu_blocks_override)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--std", type=float, default=0.2,
                    help="adapter weight std (0.05 changed the greedy output of only 3 in 48 requests)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    adapters = write_adapters(args.adapters, args.count, seed=1, std=args.std)
    write_s = time.perf_counter() - t0
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # to read the scheduler's pool afterwards
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=LLAMA2_CONFIG_DIR, load_format="dummy", skip_tokenizer_init=True, dtype="float16",
              max_model_len=512, gpu_memory_utilization=0.9, seed=0, num_gpu_blocks_override=args.blocks,
              additional_config={"slora": {"adapter_dir": args.adapters, "max_lora_rank": 8,
                                           "max_adapters_per_step": 128}})
    rng = random.Random(0)
    reqs = []
    for i in range(args.requests):
        j = i % args.count if i < args.count else rng.randrange(args.count)
        prompt = [rng.randrange(100, 30000) for _ in range(rng.randrange(16, 96))]
        reqs.append((j, prompt))
    lora = [LoRARequest(name, j + 1, os.path.join(args.adapters, name)) for j, (name, _) in enumerate(adapters)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False, logprobs=5)

    def run(batch):
        outs = llm.generate([{"prompt_token_ids": p} for _, p in batch], params,
                            lora_request=[lora[j] if j >= 0 else None for j, _ in batch], use_tqdm=False)
        # per position: the chosen token's log-prob and the top-5 {token: log-prob}
        return [(list(o.outputs[0].token_ids),
                 [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
                 [{int(k): v.logprob for k, v in lp.items()} for lp in o.outputs[0].logprobs])
                for o in outs]

    t0 = time.perf_counter()
    mixed = run(reqs)
    mixed_s = time.perf_counter() - t0
    sched = scheduler_of(llm)
    stats_after_mixed = sched.pool_stats()

    sample = rng.sample(range(args.requests), args.solo)
    rows = []
    for i in sample:
        j, prompt = reqs[i]
        (solo_tokens, solo_lp, solo_top), = run([(j, prompt)])
        (base_tokens, _, _), = run([(-1, prompt)])
        m_tokens, m_lp, m_top = mixed[i]
        prefix = 0
        while prefix < len(solo_tokens) and m_tokens[prefix] == solo_tokens[prefix]:
            prefix += 1
        lp_err = max((abs(a - b) for a, b in zip(m_lp[:prefix + 1], solo_lp[:prefix + 1])), default=0.0)
        rows.append({"request": i, "adapter": adapters[j][0], "rank": adapters[j][1],
                     "tokens_equal": m_tokens == solo_tokens, "common_prefix": prefix,
                     "max_abs_logprob_err_on_prefix": lp_err,
                     "adapter_changes_output": solo_tokens != base_tokens,
                     # where the runs part: both top-5 distributions, to tell a near-tie from a wrong read
                     "divergence_top5": None if m_tokens == solo_tokens else {
                         "position": prefix, "mixed": m_top[prefix], "solo": solo_top[prefix]}})
    final = sched.pool_stats()
    consistent = (final["pages_free"] + final["pages_adapters"] == final["pages_total"]
                  and final["pages_kv"] == 0)
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
        "model": "llama-2-7b shape, dummy weights, fp16",
        "adapters": args.count, "adapter_weight_std": args.std, "adapter_targets": ["o_proj"], "ranks": "1-8",
        "requests": args.requests, "kv_blocks": args.blocks, "write_adapters_s": round(write_s, 1),
        "mixed_generate_s": round(mixed_s, 2),
        "pool_after_mixed": stats_after_mixed, "pool_final": final,
        "pool_accounting_consistent": consistent,
        "solo_tokens_equal": sum(r["tokens_equal"] for r in rows),
        "solo_checked": len(rows),
        "adapters_changing_output": sum(r["adapter_changes_output"] for r in rows),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
