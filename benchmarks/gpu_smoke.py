"""GPU smoke run: vLLM serves a dummy Llama-2-7B with the plugin off and on.

Each mode runs in its own process (so GPU memory is returned between them):

    python benchmarks/gpu_smoke.py --mode off --out OUT.json
    python benchmarks/gpu_smoke.py --mode on  --out OUT.json --adapters DIR

It records what a user would check first: the engine starts, generates the requested number of
tokens for every prompt, how long start-up took, and how many KV blocks vLLM allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_CONFIG_DIR = os.path.join(HERE, "configs", "llama-2-7b")


def write_adapters(adapter_dir: str, ranks: list[int]) -> list[str]:
    """A few random q,k,v,o adapters of the Llama-2-7B shape (written on the GPU host)."""
    import torch

    from slora_plugin.adapters.peft_format import write_random_adapter
    from slora_plugin.model_config import load_model_dims

    dims = load_model_dims(LLAMA2_CONFIG_DIR)
    names = []
    for i, r in enumerate(ranks):
        name = f"smoke-r{r}-{i}"
        write_random_adapter(os.path.join(adapter_dir, name), dims, r,
                             ("q_proj", "k_proj", "v_proj", "o_proj"), seed=i, dtype=torch.float16)
        names.append(name)
    return names


def run(mode: str, adapter_dir: str | None, n_prompts: int, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=LLAMA2_CONFIG_DIR, load_format="dummy", skip_tokenizer_init=True,
                  dtype="float16", max_model_len=1024, gpu_memory_utilization=0.85, seed=0)
    lora_requests = None
    if mode == "on":
        assert adapter_dir
        names = write_adapters(adapter_dir, [8, 16, 32, 64])
        kwargs["additional_config"] = {"slora": {"adapter_dir": adapter_dir, "max_lora_rank": 64}}
        lora_requests = [LoRARequest(n, i + 1, os.path.join(adapter_dir, n))
                         for i, n in enumerate(names)]
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(64)]}
               for _ in range(n_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    per_request = ([lora_requests[i % len(lora_requests)] for i in range(n_prompts)]
                   if lora_requests else None)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=per_request, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    engine = llm.llm_engine
    cache = engine.vllm_config.cache_config
    return {
        "mode": mode,
        "ok": all(n == max_tokens for n in lengths),
        "requests": n_prompts,
        "output_tokens": sum(lengths),
        "init_s": round(init_s, 2),
        "gen_s": round(gen_s, 3),
        "num_gpu_blocks": cache.num_gpu_blocks,
        "lora_enabled": engine.vllm_config.lora_config is not None,
        "worker_cls": engine.vllm_config.parallel_config.worker_cls,
        "scheduler_cls": str(engine.vllm_config.scheduler_config.scheduler_cls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("off", "on"), required=True)
    ap.add_argument("--out", required=True, help="JSON file the result row is appended to")
    ap.add_argument("--adapters", help="directory to write the smoke adapters into (mode on)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    row = run(args.mode, args.adapters, args.prompts, args.max_tokens)
    print(json.dumps(row))
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    import torch

    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
              "rows": rows + [row]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
