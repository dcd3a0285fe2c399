"""Multi-LoRA fine-tuning throughput (issue 16): mixed batches (mLoRA) against PEFT training the
same adapters one after another.

For each N of --n-adapters: N adapters (rank --rank on --targets), each a small job of
--seqs-per-adapter sequences of --seq-len random tokens per step, on a base built from --config
(default Llama-2-7B's shape) with dummy (random) weights in --dtype:
  - mixed: `slora_plugin.train.trainer.Trainer`, every adapter in every step, micro-batches of
    --micro-batch-tokens padded tokens, the paged backend on the GPU;
  - PEFT sequential: each adapter trained alone with PEFT + transformers, same data order, init,
    AdamW, linear schedule, clipping and micro-batches. Adapters trained one after another share
    nothing, so the sequential rate does not depend on N: min(N, --peft-adapters) of them are
    measured and their rate stands for all N (the row says how many);
  - base only: the frozen base model alone (no LoRA layers, no trainable parameter) running
    forward + backward, same loss, on the mixed step's rows (every adapter's, micro-batched as the
    mixed run packs them), with gradients flowing only to the embedding output (detached,
    requiring grad): the activation gradients through every layer that any frozen-base LoRA
    trainer must compute, no weight gradient, no optimizer: the ceiling of the mixed run's
    tokens/s at that N. Measured for every N (its fresh base, before PEFT and the Trainer touch
    it; --warmup + --steps steps); --no-base-only skips it.
Throughput counts the input tokens of the timed steps (after --warmup untimed steps), between
device synchronizations. `max_rel_loss_diff`: the largest |mixed - PEFT| / PEFT of a step's loss
over the adapters PEFT trained and every step (fp32 on the CPU: ~1e-6; bf16 rounds differently).

Writes benchmarks/results/finetune-[TAG-]<date>.json (`date`, `device`, `settings`, `rows` with
`n_adapters`, `tokens_per_s`, `peft_sequential_tokens_per_s`, `max_rel_loss_diff`, and `speedup`,
`step_s`, `peft_adapters_measured`, `base_only_tokens_per_s`, `fraction_of_base_only` = mixed
tokens_per_s / base_only_tokens_per_s; the last two null with --no-base-only) and prints a markdown
table.

    python benchmarks/finetune_bench.py [--n-adapters 1,4,16,64] [--seq-len 512] [--tag h100]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import tempfile
import time
from typing import Callable, Iterator

import torch
from torch import nn

from slora_plugin.train.bank import AdapterBank, AdapterShape
from slora_plugin.train.data import AdapterStream, Row, load_samples, micro_batches
from slora_plugin.train.job import TrainJob, parse_job
from slora_plugin.train.peft_io import adapter_tensors
from slora_plugin.train.targets import resolve_targets
from slora_plugin.train.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, "configs", "llama-2-7b")


def build_base(config_dir: str, dtype: torch.dtype, device: str) -> nn.Module:
    """The base model with random weights, built directly on `device` (7B in seconds on a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def write_job(workdir: str, args: argparse.Namespace, n: int, vocab: int) -> TrainJob:
    """N adapters with random token data: exactly the sequences of warmup + timed steps."""
    steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(n):
        path = os.path.join(workdir, f"a{i}.jsonl")
        ids = torch.randint(0, vocab, (steps * args.seqs_per_adapter, args.seq_len), generator=gen)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist())
        adapters.append({"name": f"a{i}", "data": path, "rank": args.rank, "alpha": args.alpha,
                         "target_modules": args.targets.split(","), "lr": args.lr, "batch_size": args.seqs_per_adapter,
                         "steps": steps, "seed": i, "shuffle": False})
    return parse_job({"base_model": args.config, "output_dir": os.path.join(workdir, "out"), "dtype": args.dtype,
                      "device": args.device, "backend": args.backend, "micro_batch_tokens": args.micro_batch_tokens,
                      "checkpoint_every": 10 ** 9, "adapters": adapters}, workdir)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def initial_tensors(base: nn.Module, job: TrainJob, slot: int) -> dict[str, torch.Tensor]:
    """The trainer's init of adapter `slot` (a CPU bank of that adapter alone, same seed)."""
    a = job.adapters[slot]
    names = resolve_targets(base, a.target_modules)
    mods = dict(base.named_modules())
    bank = AdapterBank({n: (mods[n].in_features, mods[n].out_features) for n in names},
                       [AdapterShape(a.rank, a.alpha, tuple(names))], "cpu", None)
    bank.init_adapter(0, a.seed)
    return adapter_tensors(bank, 0, torch.float32)


def adapter_steps(job: TrainJob, slot: int, vocab: int) -> list[list[Row]]:
    """The rows of each step of adapter `slot`, in the order the Trainer takes them."""
    a = job.adapters[slot]
    samples = load_samples(a.data, vocab, a.max_seq_len)
    stream = AdapterStream(len(samples), a.batch_size, a.seed, a.shuffle)
    return [[Row(0, samples[i]) for i in stream.batch(step)] for step in range(a.steps)]


def forward_backward(model: nn.Module, rows: list[Row], micro_batch_tokens: int, device: str,
                     embed: nn.Module | None = None) -> torch.Tensor:
    """One step's loss with its backward done: each micro-batch's mean loss weighted by its share
    of the step's target tokens (what the Trainer optimizes). With `embed`, the model takes its
    output detached and requiring grad, so a model with no trainable parameter still runs backward."""
    n_targets = sum(r.sample.num_targets for r in rows)
    total = torch.zeros((), device=device)  # summed on the device: no sync inside the step
    for mb in micro_batches(rows, micro_batch_tokens):
        share = float((mb.labels[:, 1:] != -100).sum()) / n_targets
        ids = mb.input_ids.to(device)
        inputs = {"input_ids": ids} if embed is None else {"inputs_embeds": embed(ids).detach().requires_grad_(True)}
        out = model(**inputs, attention_mask=mb.attention_mask.to(device), labels=mb.labels.to(device),
                    use_cache=False)
        (out.loss * share).backward()
        total += out.loss.detach() * share
    return total


@contextlib.contextmanager
def frozen_training(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in train mode with no parameter requiring grad; every parameter's requires_grad and
    every module's mode restored on exit, so the PEFT and mixed runs after it get the base as built."""
    grads = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        model.requires_grad_(False)
        model.train()
        yield model
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training


def mixed_steps(job: TrainJob, vocab: int) -> list[list[Row]]:
    """The rows of each step with every adapter in it (adapter i's rows as `Row(i, ...)`), as the
    mixed run takes them."""
    per_adapter = [adapter_steps(job, slot, vocab) for slot in range(len(job.adapters))]
    return [[Row(slot, r.sample) for slot, steps in enumerate(per_adapter) for r in steps[step]]
            for step in range(len(per_adapter[0]))]


def base_only(base: nn.Module, job: TrainJob, warmup: int, device: str) -> float:
    """Tokens/s of the frozen base alone on the mixed run's steps (see the module docstring): the
    ceiling of any LoRA trainer on these micro-batches."""
    tokens, seconds = 0, 0.0
    with frozen_training(base):
        embed = base.get_input_embeddings()
        for step, rows in enumerate(mixed_steps(job, base.config.vocab_size)):
            sync(device)
            t0 = time.perf_counter()
            forward_backward(base, rows, job.micro_batch_tokens, device, embed)
            sync(device)
            if step >= warmup:
                seconds += time.perf_counter() - t0
                tokens += sum(len(r.sample.input_ids) for r in rows)
    return tokens / seconds


def peft_sequential(base: nn.Module, job: TrainJob, slots: list[int], warmup: int,
                    device: str) -> tuple[float, dict[str, list[float]], nn.Module]:
    """Train each adapter of `slots` alone with PEFT; (tokens/s over the timed steps, losses per
    adapter, the base with PEFT's layers removed again)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    losses, tokens, seconds = {}, 0, 0.0
    for slot in slots:
        a = job.adapters[slot]
        init = initial_tensors(base, job, slot)
        model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=list(a.target_modules),
                                                lora_dropout=0.0))
        set_peft_model_state_dict(model, init)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, betas=job.adam_betas, eps=job.adam_eps, weight_decay=a.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, a.warmup_steps, a.steps)
        losses[a.name] = []
        for step, rows in enumerate(adapter_steps(job, slot, model.config.vocab_size)):
            sync(device)
            t0 = time.perf_counter()
            total = forward_backward(model, rows, job.micro_batch_tokens, device)
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses[a.name].append(float(total))
            sync(device)
            if step >= warmup:
                seconds += time.perf_counter() - t0
                tokens += sum(len(r.sample.input_ids) for r in rows)
        base = model.unload()
        del model, opt, params
    return tokens / seconds, losses, base


def mixed(base: nn.Module, job: TrainJob, warmup: int, device: str) -> tuple[float, float, dict[str, list[float]]]:
    """All adapters in every step; (tokens/s, seconds per timed step, losses per adapter)."""
    trainer = Trainer(job, model=base)
    losses: dict[str, list[float]] = {a.name: [] for a in job.adapters}
    seconds, tokens = 0.0, 0
    for step in range(trainer.num_steps):
        sync(device)
        t0, seen = time.perf_counter(), trainer.tokens_seen
        for log in trainer.train_step():
            losses[log.adapter].append(log.loss)
        sync(device)
        if step >= warmup:
            seconds += time.perf_counter() - t0
            tokens += trainer.tokens_seen - seen
    return tokens / seconds, seconds / (trainer.num_steps - warmup), losses


def run(args: argparse.Namespace, write: Callable[[dict], None] = lambda result: None,
        day: str | None = None) -> dict:
    """Every N of --n-adapters in turn; `write(result so far)` after each row, so a run cut
    by a time limit keeps the rows it finished. The base-only rate is measured in each row's
    fresh base, before PEFT and the Trainer touch it."""
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    settings = {k: getattr(args, k) for k in ("config", "seqs_per_adapter", "seq_len", "rank", "alpha", "targets",
                                              "lr", "steps", "warmup", "micro_batch_tokens", "dtype", "backend")}
    result = {"date": day or datetime.date.today().isoformat(), "device": device, "settings": settings, "rows": []}
    rows = result["rows"]
    for n in (int(v) for v in args.n_adapters.split(",")):
        with tempfile.TemporaryDirectory() as workdir:
            base = build_base(args.config, dtype, args.device)
            job = write_job(workdir, args, n, base.config.vocab_size)
            base_tps = base_only(base, job, args.warmup, args.device) if args.base_only else None
            measured = list(range(min(n, args.peft_adapters)))
            peft_tps, peft_losses, base = peft_sequential(base, job, measured, args.warmup, args.device)
            tps, step_s, ours = mixed(base, job, args.warmup, args.device)
            diff = max(abs(o - p) / abs(p) for name, ps in peft_losses.items() for o, p in zip(ours[name], ps))
            rows.append({"n_adapters": n, "tokens_per_s": round(tps, 1),
                         "peft_sequential_tokens_per_s": round(peft_tps, 1),
                         "max_rel_loss_diff": diff, "speedup": round(tps / peft_tps, 3), "step_s": round(step_s, 4),
                         "peft_adapters_measured": len(measured),
                         "base_only_tokens_per_s": None if base_tps is None else round(base_tps, 1),
                         "fraction_of_base_only": None if base_tps is None else round(tps / base_tps, 3)})
            ceiling = "" if base_tps is None else f", base only {base_tps:,.0f} tok/s ({tps / base_tps:.0%} of it)"
            print(f"N={n}: mixed {tps:,.0f} tok/s, PEFT sequential {peft_tps:,.0f} tok/s "
                  f"(x{tps / peft_tps:.2f}){ceiling}, max rel loss diff {diff:.2e}", flush=True)
            write(result)
            del base, job
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return result


def table(result: dict) -> str:
    """The rows in markdown; the base-only column says "-" when it was skipped."""
    lines = ["| adapters | mixed tok/s | PEFT sequential tok/s | speedup | base only tok/s (mixed's fraction) "
             "| max rel loss diff |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        base = r["base_only_tokens_per_s"]
        ceiling = "-" if base is None else f"{base:,.0f} ({r['fraction_of_base_only']:.2f})"
        lines.append(f"| {r['n_adapters']} | {r['tokens_per_s']:,.0f} | {r['peft_sequential_tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.2f}x | {ceiling} | {r['max_rel_loss_diff']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help="directory of the base model's config.json (dummy weights)")
    p.add_argument("--n-adapters", default="1,4,16,64")
    p.add_argument("--seqs-per-adapter", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated PEFT module names")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiles, allocator)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--peft-adapters", type=int, default=4, help="adapters PEFT trains to measure its rate")
    p.add_argument("--no-base-only", dest="base_only", action="store_false",
                   help="skip the frozen base's forward + backward alone (the LoRA ceiling, for every N)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "paged", "torch"))
    p.add_argument("--out", default=RESULTS, help="results directory")
    p.add_argument("--tag", default="", help="file name tag: finetune-TAG-<date>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    day = datetime.date.today().isoformat()
    name = "-".join(x for x in ("finetune", args.tag, day) if x) + ".json"
    path = os.path.join(args.out, name)

    def write(result: dict) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)

    result = run(args, write, day)
    write(result)
    print(table(result))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
