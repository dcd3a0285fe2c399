"""End-to-end correctness on the GPU: vLLM + slora-plugin vs the same model with the adapter merged.

Two modes, because the GPU machine may not have `peft`/`transformers` model code at hand:

  --prepare DIR   (here, on CPU) writes a tiny random Llama (fp16, GQA), >= 8 adapters written by
                  the `peft` library itself (mixed ranks and targets, rank_pattern/alpha_pattern,
                  rsLoRA, regex target_modules, MLP modules) and `reference.json`: for each adapter
                  a prompt, the greedy continuation of the merged model (PEFT merge_and_unload, fp32)
                  and its per-token log-probabilities, plus the base model's for the same tokens.
  --run DIR       (on the GPU, needs only vLLM + torch + the plugin) runs every adapter (and one
                  request without adapter) in ONE mixed generate() batch, with CUDA graphs off and
                  on (one child process each), and writes benchmarks/results/correctness-<date>.json.
                  `--model-runner v1` (or v2) forces vLLM's model runner (VLLM_USE_V2_MODEL_RUNNER;
                  0.26 picks V2 for dense models) and writes correctness-<runner>-<date>.json.
                  `--compressed COLL` (a collection made from DIR/adapters by `slora-plugin adapters
                  compress`) serves a copy of DIR/adapters with COLL as `coll/`, and requests every
                  adapter twice in the batch, plain and as `coll/<name>` (rows named so), against
                  the same reference; writes correctness-compressed-<date>.json.

Two checks per request: `tokens_equal` (vLLM's greedy tokens == the merged model's) and
`max_abs_logprob_err`, the largest |logprob| difference on the reference continuation, teacher
forced through vLLM's prompt_logprobs (so it is measured at every position even if greedy
decoding diverges on a near-tie). `adapter_effect` is the same difference between the merged
and the base model: an error well below it shows the adapter was really applied.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys

PROMPT_LEN = 12
NEW_TOKENS = 8
VOCAB = 1000
#: --model-runner -> VLLM_USE_V2_MODEL_RUNNER (read by vllm.config.VllmConfig.use_v2_model_runner).
RUNNER_ENV = {"v1": "0", "v2": "1"}

#: name -> (peft LoraConfig kwargs). Ranks/targets deliberately mixed.
ADAPTERS: dict[str, dict] = {
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all_r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]),
    "mlp_r4": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "attn_rslora_r8": dict(r=8, lora_alpha=32, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                        rank_pattern={"o_proj": 2, "model.layers.1.self_attn.q_proj": 12},
                        alpha_pattern={"down_proj": 64}),
    "regex_r6": dict(r=6, lora_alpha=12, target_modules=r".*\.layers\.1\..*(q_proj|down_proj)"),
    "o_r1": dict(r=1, lora_alpha=2, target_modules=["o_proj"]),
    "kup_r16": dict(r=16, lora_alpha=16, target_modules=["k_proj", "up_proj"]),
}

MODEL_CONFIG = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, num_hidden_layers=2, vocab_size=VOCAB,
                    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2)


# --------------------------------------------------------------------------- prepare (CPU)
def prepare(directory: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = os.path.join(directory, "model")
    cfg = LlamaConfig(**MODEL_CONFIG)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in base.parameters():  # larger weights than HF's init: a peakier, less tie-prone model
            if p.dim() == 2:
                p.normal_(0, 0.06)
        base.lm_head.weight.normal_(0, 0.4)
    base.to(torch.float16).save_pretrained(model_dir, safe_serialization=True)
    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(1)
    refs = []
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32),
                                    LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        peft_model.save_pretrained(os.path.join(directory, "adapters", name))
        merged = peft_model.merge_and_unload().eval()
        prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g).tolist()
        tokens, lps = _greedy(merged, prompt)
        base_lps = _teacher_forced(base, prompt, tokens)
        refs.append(dict(adapter=name, lora_id=i + 1, prompt=prompt, tokens=tokens, logprobs=lps,
                         base_logprobs=base_lps, rank=kw["r"], min_top2_margin=_greedy.margin,
                         target_modules=kw["target_modules"]))
    prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=g).tolist()
    tokens, lps = _greedy(base, prompt)
    refs.append(dict(adapter=None, lora_id=0, prompt=prompt, tokens=tokens, logprobs=lps,
                     base_logprobs=lps, rank=0, target_modules=[], min_top2_margin=_greedy.margin))
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump(dict(model=MODEL_CONFIG, new_tokens=NEW_TOKENS, requests=refs), f)
    total = sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(directory) for x in fs)
    print(f"prepared {directory}: {len(refs)} requests, {total / 2**20:.2f} MiB")


def _greedy(model, prompt):
    import torch

    ids = list(prompt)
    out, lps, margins = [], [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            top = torch.topk(lp, 2).values
            t = int(lp.argmax())
            out.append(t)
            lps.append(float(lp[t]))
            margins.append(float(top[0] - top[1]))
            ids.append(t)
    _greedy.margin = min(margins)  # smallest top-1/top-2 gap: how tie-prone greedy decoding is
    return out, lps


def _teacher_forced(model, prompt, tokens):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return [float(lp[n - 1 + j, t]) for j, t in enumerate(tokens)]


# --------------------------------------------------------------------------- run (GPU)
def run_one(directory: str, eager: bool, out_path: str, adapters_dir: str | None = None,
            compressed: bool = False) -> None:
    """One engine, one mixed batch: greedy generation, then teacher-forced prompt logprobs.
    `compressed`: `adapters_dir` holds the collection `coll/` too; each adapter's request is
    repeated as `coll/<name>` (another lora id) with the same reference."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(os.path.join(directory, "reference.json")) as f:
        ref = json.load(f)
    adapters_dir = adapters_dir or os.path.join(directory, "adapters")
    llm = LLM(os.path.join(directory, "model"), dtype="float16", enforce_eager=eager,
              skip_tokenizer_init=True, max_model_len=128, gpu_memory_utilization=0.3, seed=0,
              additional_config={"slora": {"adapter_dir": adapters_dir, "max_lora_rank": 16,
                                           "max_adapters_per_step": 16}})
    reqs = ref["requests"]
    if compressed:
        reqs = reqs + [dict(r, adapter=f"coll/{r['adapter']}", lora_id=r["lora_id"] + 10_000)
                       for r in reqs if r["adapter"]]
    loras = [LoRARequest(r["adapter"], r["lora_id"], os.path.join(adapters_dir, r["adapter"]))
             if r["adapter"] else None for r in reqs]
    gen = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in reqs],
                       SamplingParams(temperature=0.0, max_tokens=ref["new_tokens"], logprobs=1,
                                      detokenize=False, ignore_eos=True),
                       lora_request=loras)
    forced = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"] + r["tokens"]) for r in reqs],
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                         detokenize=False),
                          lora_request=loras)
    runner = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    rows = []
    for r, g, fo in zip(reqs, gen, forced):
        toks = list(g.outputs[0].token_ids)
        n = len(r["prompt"])
        vllm_lps = [fo.prompt_logprobs[n + j][t].logprob for j, t in enumerate(r["tokens"])]
        rows.append(dict(
            adapter=r["adapter"] or "(none)", rank=r["rank"], target_modules=r["target_modules"],
            cudagraphs=not eager, model_runner=runner, tokens_equal=toks == r["tokens"], vllm_tokens=toks,
            reference_tokens=r["tokens"], reference_min_top2_margin=r["min_top2_margin"],
            max_abs_logprob_err=max(abs(a - b) for a, b in zip(vllm_lps, r["logprobs"])),
            adapter_effect=max(abs(a - b) for a, b in zip(r["logprobs"], r["base_logprobs"]))))
    with open(out_path, "w") as f:
        json.dump(rows, f)


def run(directory: str, results_dir: str, runner: str | None = None,
        compressed: str | None = None) -> int:
    import shutil
    import tempfile

    import torch

    if runner is not None:  # inherited by the child processes below
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = RUNNER_ENV[runner]
    extra: list[str] = []
    if compressed:  # copies, not symlinks: the adapter index refuses links leading outside it
        adapters = tempfile.mkdtemp(prefix="correctness-adapters-")
        shutil.copytree(os.path.join(directory, "adapters"), adapters, dirs_exist_ok=True)
        shutil.copytree(compressed, os.path.join(adapters, "coll"))
        extra = ["--adapters", adapters, "--compressed", compressed]
    rows = []
    for eager in (True, False):
        part = os.path.join(results_dir, f".correctness-{'eager' if eager else 'graphs'}.json")
        cmd = ([sys.executable, __file__, "--run-one", directory, "--out", part] + extra
               + (["--eager"] if eager else []))
        print("$", " ".join(cmd), flush=True)
        if os.path.exists(part):  # left by an interrupted run: not this run's rows
            os.remove(part)
        # faulthandler: an abnormal exit (the compressed eager run aborted at exit on the H100,
        # 2026-12-06) prints every thread's Python stack, of this child and its engine process
        rc = subprocess.call(cmd, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        if rc != 0:  # still a failure, but rows written before an abnormal exit are kept
            print(f"run with enforce_eager={eager} FAILED (exit {rc})", flush=True)
            rows.append(dict(adapter="*", cudagraphs=not eager, error=f"exit status {rc}"))
        if os.path.exists(part):
            with open(part) as f:
                rows.extend(json.load(f))
            os.remove(part)
    day = _dt.date.today().isoformat()
    result = dict(date=day, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  model=f"random Llama {MODEL_CONFIG}", model_runner_forced=runner,
                  compressed=compressed, rows=rows)
    os.makedirs(results_dir, exist_ok=True)
    kind = (runner + "-" if runner else "") + ("compressed-" if compressed else "")
    path = os.path.join(results_dir, f"correctness-{kind}{day}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    ok = all(r.get("tokens_equal") and (runner is None or r["model_runner"] == runner) for r in rows)
    for r in rows:
        print(f"{r['adapter']:>16} graphs={r['cudagraphs']!s:5} runner={r.get('model_runner')} "
              f"tokens_equal={r.get('tokens_equal')} "
              f"logprob_err={r.get('max_abs_logprob_err', float('nan')):.4f} "
              f"effect={r.get('adapter_effect', float('nan')):.4f} {r.get('error', '')}")
    print(f"wrote {path}: {'ALL TOKENS EQUAL' if ok else 'MISMATCHES'}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", metavar="DIR")
    ap.add_argument("--run", metavar="DIR")
    ap.add_argument("--run-one", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model-runner", choices=sorted(RUNNER_ENV),
                    help="force vLLM's V1 or V2 GPU model runner (default: vLLM's choice)")
    ap.add_argument("--compressed", metavar="COLL",
                    help="also serve each adapter from this collection of DIR/adapters, as coll/<name>")
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    if a.prepare:
        prepare(a.prepare)
        return 0
    if a.run_one:
        run_one(a.run_one, a.eager, a.out, a.adapters, bool(a.compressed))
        return 0
    if a.run:
        return run(a.run, a.results, a.model_runner, a.compressed)
    ap.error("give --prepare DIR or --run DIR")
    return 2


if __name__ == "__main__":
    sys.exit(main())
