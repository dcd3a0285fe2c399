"""Compression quality on real trained adapters (CPU): task loss uncompressed vs compressed, by K.

    python benchmarks/compress_quality.py [--adapters 12] [--steps 40] [--ks 2,4,8,16,32,64]
                                          [--out-dir benchmarks/results] [--work-dir DIR]

Why trained adapters: random ones (what `adapters synth` writes) have no shared structure, so no
shared rank-K bases fit them (their relative error stays near sqrt(1 - K / sum of ranks)); real
adapters fine-tuned from one base model on related tasks share subspaces, which is what
Compress-then-Serve exploits. We cannot download real adapters, so this script makes some: PEFT
LoRAs (ranks 4 and 8 alternating, all seven modules) trained with transformers on the tiny
correctness model (`benchmarks/fixtures/correctness/model`, 2 layers, hidden 256) on synthetic
tasks that differ per adapter. Task i: sequences BOS x1 y1 x2 y2 ... of 8 pairs over a 16-symbol
alphabet, y = pi_i(x) for the task's own random permutation pi_i (or, with --related-swaps S, its
alphabet's shared permutation with S transpositions of its own: customers' variations of one
task); even tasks use alphabet A (tokens 100-115), odd ones alphabet B (200-215): two domains, so
clusters can matter. Loss and
accuracy (greedy) are on the y tokens of a held-out set of the task.

Each adapter is evaluated by adding its ΔW to the base weights: uncompressed (s B A read by the
project's reader; checked against PEFT's own model), and compressed (U Σ Vᵀ of
`CompressedCollection.delta`) for every K, full and diagonal cores, 1 and 2 clusters, stored in
fp16. The same K grid compresses as many random adapters of the same ranks (relative error only).
Writes `compress-quality-cpu-<date>.json` and prints a markdown table. ~7 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from slora_plugin.adapters.cli import model_dims
from slora_plugin.adapters.peft_format import MODULE_PARENT, write_random_adapter
from slora_plugin.compress.api import compress_collection
from slora_plugin.compress.collection import CompressedCollection
from slora_plugin.compress.source import open_collection, read_module
from slora_plugin.layout import MODULES

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "fixtures", "correctness", "model")
ALPHABETS = (100, 200)
SYMBOLS = 16
PAIRS = 8
RANKS = (4, 8)
EVAL_SEQS = 32


@dataclass(frozen=True)
class Task:
    index: int
    name: str
    alphabet: int
    perm: torch.Tensor
    rank: int

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, labels): labels are -100 except on the y tokens (transformers shifts them)."""
        x = torch.randint(0, SYMBOLS, (n, PAIRS), generator=gen)
        seq = torch.stack([self.alphabet + x, self.alphabet + self.perm[x]], dim=2).view(n, 2 * PAIRS)
        seq = torch.cat([torch.ones(n, 1, dtype=torch.long), seq], dim=1)
        labels = torch.full_like(seq, -100)
        labels[:, 2::2] = seq[:, 2::2]
        return seq, labels


def task_permutation(i: int, related_swaps: int | None) -> torch.Tensor:
    """Task i's pi: its own random permutation, or (related tasks) its alphabet's shared
    permutation with `related_swaps` random transpositions of its own."""
    gen = torch.Generator().manual_seed(i)
    if related_swaps is None:
        return torch.randperm(SYMBOLS, generator=gen)
    perm = torch.randperm(SYMBOLS, generator=torch.Generator().manual_seed(1_000 + i % len(ALPHABETS)))
    for _ in range(related_swaps):
        a, b = torch.randint(SYMBOLS, (2,), generator=gen).tolist()
        perm[[a, b]] = perm[[b, a]]
    return perm


def load_base():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def evaluate(model, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(mean cross-entropy, greedy accuracy) on the labelled tokens."""
    ids, labels = batch
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    acc = (logits[mask].argmax(-1) == target[mask]).float().mean()
    return float(loss), float(acc)


def train(task: Task, steps: int, out_dir: str, seed: int) -> tuple[float, float]:
    """Train one PEFT LoRA on `task`, save it under out_dir/<name>; its (loss, acc) per PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(), LoraConfig(r=task.rank, lora_alpha=2 * task.rank, lora_dropout=0.0,
                                                   target_modules=list(MODULES)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids, labels = task.batch(8, gen)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(os.path.join(out_dir, task.name))
    return evaluate(model, eval_batch(task))


def eval_batch(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    return task.batch(EVAL_SEQS, torch.Generator().manual_seed(10_000 + task.index))


class DeltaModel:
    """The base model whose linear weights take W0 + ΔW for one adapter at a time."""

    def __init__(self) -> None:
        self.model = load_base()
        self.layers = self.model.model.layers
        self.w0 = {(l, m): self._linear(l, m).weight.detach().clone() for l in range(len(self.layers)) for m in MODULES}

    def _linear(self, layer: int, module: str):
        return getattr(getattr(self.layers[layer], MODULE_PARENT[module]), module)

    def run(self, deltas: dict[tuple[int, str], torch.Tensor], batch) -> tuple[float, float]:
        with torch.no_grad():
            for key, w0 in self.w0.items():
                d = deltas.get(key)
                self._linear(*key).weight.copy_(w0 if d is None else w0 + d.float())
        return evaluate(self.model, batch)


def uncompressed_deltas(src: str, dims) -> dict[str, dict[tuple[int, str], torch.Tensor]]:
    """s B A of every adapter, (layer, module) -> dense, through the project's reader."""
    adapters = open_collection(src, dims)
    out: dict[str, dict[tuple[int, str], torch.Tensor]] = {ad.name: {} for ad in adapters}
    for layer in range(dims.num_hidden_layers):
        for m in MODULES:
            stack = read_module(adapters, layer, m, dims)
            if stack is None:
                continue
            for j, i in enumerate(stack.members):
                out[adapters[i].name][(layer, m)] = stack.scales[j] * stack.b[j].double() @ stack.a[j].double()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=12)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine the compression's many small ops "
                        "ran 35x slower with 2 threads)")
    p.add_argument("--ks", default="2,4,8,16,32,64")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--related-swaps", type=int, default=None,
                   help="related tasks: each alphabet's tasks share one permutation up to this many "
                        "transpositions of their own (default: every task its own random permutation)")
    p.add_argument("--work-dir", default=None, help="where adapters and collections go (default: a temp dir)")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="compress-quality-")
    dims = model_dims(MODEL)
    started = time.time()

    tasks = [Task(i, f"task-{i:02d}", ALPHABETS[i % 2], task_permutation(i, args.related_swaps), RANKS[(i // 2) % 2])
             for i in range(args.adapters)]
    src = os.path.join(work, "adapters")
    peft_scores = {}
    for i, task in enumerate(tasks):
        peft_scores[task.name] = train(task, args.steps, src, seed=i)
        print(f"trained {task.name} (rank {task.rank}): loss {peft_scores[task.name][0]:.4f}, "
              f"acc {peft_scores[task.name][1]:.3f} ({time.time() - started:.0f} s)", file=sys.stderr)
    rand = os.path.join(work, "random")
    for i, task in enumerate(tasks):
        write_random_adapter(os.path.join(rand, task.name), dims, task.rank, list(MODULES), seed=i, dtype=torch.float32)

    dm = DeltaModel()
    batches = {t.name: eval_batch(t) for t in tasks}
    base = {t.name: dm.run({}, batches[t.name]) for t in tasks}
    full = uncompressed_deltas(src, dims)
    uncompressed = {t.name: dm.run(full[t.name], batches[t.name]) for t in tasks}
    peft_gap = max(abs(uncompressed[n][0] - peft_scores[n][0]) for n in peft_scores)

    variants = [("full", 1, k) for k in ks] + [("diagonal", 1, k) for k in ks if k >= 4] + \
               [("full", 2, k) for k in ks if 4 <= k <= 32]
    rows, per_adapter = [], {t.name: {"rank": t.rank, "alphabet": t.alphabet, "loss_base": base[t.name][0],
                                       "loss_uncompressed": uncompressed[t.name][0],
                                       "acc_uncompressed": uncompressed[t.name][1], "loss": {}, "acc": {}}
                             for t in tasks}
    for kind, clusters, k in variants:
        out = os.path.join(work, f"c-{kind}-{clusters}-{k}")
        report = compress_collection(src, out, k, clusters=clusters, diagonal=kind == "diagonal", dims=dims,
                                     dtype=torch.float16, device="cpu")
        coll = CompressedCollection(out)
        losses, accs = [], []
        for t in tasks:
            deltas = {(l, m): coll.delta(t.name, l, m) for l in range(dims.num_hidden_layers) for m in MODULES}
            loss, acc = dm.run(deltas, batches[t.name])
            key = f"{kind}-c{clusters}-k{k}"
            per_adapter[t.name]["loss"][key], per_adapter[t.name]["acc"][key] = loss, acc
            losses.append(loss)
            accs.append(acc)
        row = {"cores": kind, "clusters": clusters, "rank_k": k, "rel_error_mean": report["rel_error_mean"],
               "rel_error_max": report["rel_error_max"], "loss_mean": sum(losses) / len(losses),
               "loss_max": max(losses), "acc_mean": sum(accs) / len(accs), "acc_min": min(accs),
               "bytes_ratio": report["bytes"]["ratio"],
               "cores_bytes_per_adapter": report["bytes"]["per_adapter_cores_mean"]}
        if kind == "full" and clusters == 1:
            rnd = compress_collection(rand, os.path.join(work, f"r-{k}"), k, dims=dims, dtype=torch.float16,
                                      device="cpu")
            row["random_rel_error_mean"] = rnd["rel_error_mean"]
        rows.append(row)
        print(f"{kind} C={clusters} K={k}: loss {row['loss_mean']:.4f}, acc {row['acc_mean']:.3f}, rel error "
              f"{row['rel_error_mean']:.3f} ({time.time() - started:.0f} s)", file=sys.stderr)

    n = len(tasks)
    result = {
        "date": datetime.date.today().isoformat(), "device": "cpu", "model": "benchmarks/fixtures/correctness/model",
        "adapters": n, "train_steps": args.steps, "ranks": list(RANKS), "modules": list(MODULES),
        "task": f"y = pi_i(x) over {SYMBOLS} symbols, {PAIRS} pairs per sequence, alphabets {list(ALPHABETS)}, "
                + ("independent random permutations" if args.related_swaps is None else
                   f"each alphabet's permutation with {args.related_swaps} transpositions per task"),
        "related_swaps": args.related_swaps,
        "storage_dtype": "float16", "seconds": round(time.time() - started, 1),
        "base": {"loss_mean": sum(v[0] for v in base.values()) / n, "acc_mean": sum(v[1] for v in base.values()) / n},
        "uncompressed": {"loss_mean": sum(v[0] for v in uncompressed.values()) / n,
                         "acc_mean": sum(v[1] for v in uncompressed.values()) / n,
                         "max_loss_gap_vs_peft_model": peft_gap},
        "rows": rows, "per_adapter": per_adapter,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    kind = "" if args.related_swaps is None else "-related"
    path = os.path.join(args.out_dir, f"compress-quality{kind}-cpu-{result['date']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def markdown(result: dict) -> str:
    """The table for benchmarks/results/README.md."""
    base = result["base"]
    lines = [f"Base model (no adapter): loss {base['loss_mean']:.3f}, accuracy {base['acc_mean']:.3f}; "
             f"uncompressed adapters: loss {result['uncompressed']['loss_mean']:.4f}, accuracy "
             f"{result['uncompressed']['acc_mean']:.3f} ({result['adapters']} adapters, means).", "",
             "| cores | clusters | K | rel. error mean | max | random adapters' rel. error "
             "| task loss mean | max | accuracy mean | min | bytes / uncompressed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rnd = f"{r['random_rel_error_mean']:.3f}" if "random_rel_error_mean" in r else ""
        lines.append(f"| {r['cores']} | {r['clusters']} | {r['rank_k']} | {r['rel_error_mean']:.3f} "
                     f"| {r['rel_error_max']:.3f} | "
                     f"{rnd} | {r['loss_mean']:.4f} | {r['loss_max']:.4f} | {r['acc_mean']:.3f} | {r['acc_min']:.3f} | "
                     f"{r['bytes_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
