"""GPU start-up check: engine start-up time, base vs stock LoRA vs plugin, in vLLM's default
multiprocess mode (forked engine core) after the parent has run a parallel torch CPU op.

    python benchmarks/gpu_startup.py --mode base|stock-lora|plugin --out OUT.json [--adapters DIR]

One mode per process (GPU memory is returned between them). The parent first runs
`torch.randn(4096, 4096)` (as writing random adapters does), which used to hang the forked engine
core in the plugin's worker (see slora_plugin/worker/threads.py); `--no-parent-cpu-work` skips it.
It records `LLM(...)` wall time and checks a few greedy tokens; vLLM's own log lines give the
split ("Compiling a graph for compile range", "torch.compile takes", "Graph capturing finished",
"init engine (profile, create kv cache, warmup model) took"): keep the log.
"""

from __future__ import annotations

import argparse
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA2_CONFIG_DIR = os.path.join(HERE, "configs", "llama-2-7b")


def run(mode: str, adapter_dir: str | None, parent_cpu_work: bool) -> dict:
    import torch

    if parent_cpu_work:
        torch.randn(4096, 4096).sum()  # starts the parent's OpenMP pool before vLLM forks
    from vllm import LLM, SamplingParams

    kwargs = dict(model=LLAMA2_CONFIG_DIR, load_format="dummy", skip_tokenizer_init=True,
                  dtype="float16", max_model_len=1024, gpu_memory_utilization=0.85, seed=0)
    if mode == "stock-lora":
        kwargs.update(enable_lora=True, max_loras=8, max_lora_rank=64)
    elif mode == "plugin":
        if not adapter_dir:
            raise SystemExit("--adapters DIR is required with --mode plugin")
        os.makedirs(adapter_dir, exist_ok=True)
        kwargs["additional_config"] = {"slora": {"adapter_dir": adapter_dir, "max_lora_rank": 64}}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    init_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": list(range(100, 164))}] * 4, params, use_tqdm=False)
    return {"mode": mode, "parent_cpu_work": parent_cpu_work, "init_s": round(init_s, 2),
            "ok": all(len(o.outputs[0].token_ids) == 8 for o in outs),
            "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("base", "stock-lora", "plugin"), required=True)
    ap.add_argument("--out", required=True, help="JSON file the result row is appended to")
    ap.add_argument("--adapters", help="adapter directory for --mode plugin (may be empty)")
    ap.add_argument("--no-parent-cpu-work", action="store_true")
    args = ap.parse_args()
    row = run(args.mode, args.adapters, not args.no_parent_cpu_work)
    print(json.dumps(row), flush=True)
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    import torch

    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0),
                   "rows": rows + [row]}, f, indent=2)


if __name__ == "__main__":
    main()
