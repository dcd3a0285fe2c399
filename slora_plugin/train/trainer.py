"""The training loop: every step one forward and backward per micro-batch over rows that mix the
samples of every adapter still training, then one optimizer step per adapter.

Each adapter's loss is the mean cross-entropy over its own target tokens of the step (what PEFT +
transformers compute for it alone); the backward runs on the sum of those means, so each adapter's
gradient is the gradient of its own loss (their weights are disjoint and the base is frozen), and
micro-batches accumulate into the gradient sink with each adapter's step-wide token count as the
denominator. An adapter is saved (PEFT format, atomically) the moment its last step is done, so a
server watching the output directory can answer for it while the others still train.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slora_plugin.kernels.lora_function import Backend, PagedBackend, TorchBackend
from slora_plugin.train.bank import AdapterBank, AdapterShape
from slora_plugin.train.checkpoint import load_checkpoint, save_checkpoint
from slora_plugin.train.data import IGNORE_INDEX, AdapterStream, Row, load_samples, micro_batches
from slora_plugin.train.inject import MixedBatch, inject
from slora_plugin.train.job import TrainJob, total_steps
from slora_plugin.train.model import freeze, load_base_model
from slora_plugin.train.optim import AdapterOptimizer
from slora_plugin.train.peft_io import adapter_tensors, peft_config, write_adapter_atomic
from slora_plugin.train.targets import resolve_targets

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class StepLog:
    """One adapter's numbers of one step (a line of metrics.jsonl)."""

    step: int
    adapter: str
    loss: float
    tokens: int        # target tokens the loss is averaged over
    grad_norm: float   # before clipping
    lr: float


class Trainer:
    """One job: the frozen base with LoRA layers injected, the bank, the optimizers, the data."""

    def __init__(self, job: TrainJob, model: nn.Module | None = None) -> None:
        """`model`: an already built base (benchmarks build one with dummy weights); it is frozen
        and modified in place. Otherwise `job.base_model` is loaded."""
        self.job = job
        self.device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, job.dtype)
        self.model = freeze(model) if model is not None else load_base_model(job.base_model, dtype, self.device)
        model_dtype = next(self.model.parameters()).dtype
        if model_dtype != dtype:
            raise ValueError(f"the base model is {model_dtype} but the job says dtype {job.dtype}")
        self.model.train()
        config = self.model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.samples = [load_samples(a.data, config.vocab_size, a.max_seq_len) for a in job.adapters]
        self.totals = [total_steps(a, len(s)) for a, s in zip(job.adapters, self.samples)]
        self.streams = [AdapterStream(len(s), a.batch_size, a.seed, a.shuffle)
                        for a, s in zip(job.adapters, self.samples)]
        targets = [set(resolve_targets(self.model, a.target_modules)) for a in job.adapters]
        linears = [(n, m) for n, m in self.model.named_modules() if any(n in t for t in targets)]
        layers = {n: (m.in_features, m.out_features) for n, m in linears}
        shapes = [AdapterShape(a.rank, a.alpha, tuple(n for n in layers if n in t))
                  for a, t in zip(job.adapters, targets)]
        paged = job.backend == "paged" or (job.backend == "auto" and self.device.type == "cuda"
                                           and dtype in (torch.float16, torch.bfloat16))
        backend: Backend = PagedBackend(len(shapes), self.device) if paged else TorchBackend(self.device)
        self.bank = AdapterBank(layers, shapes, self.device, dtype if paged else None)
        for s, a in enumerate(job.adapters):
            self.bank.init_adapter(s, a.seed)
        self.bank.refresh_pool()
        self.mixed = MixedBatch(self.bank, backend)
        inject(self.model, self.mixed)
        self.optim = AdapterOptimizer(self.bank, job.adapters, self.totals, job.adam_betas, job.adam_eps)
        self.save_dtype = getattr(torch, job.save_dtype or job.dtype)
        self.step = 0
        self.tokens_seen = 0  # input tokens (padding excluded) of this run

    @property
    def num_steps(self) -> int:
        return max(self.totals)

    # ---- resume / checkpoint ------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the job's checkpoint if there is one (ValueError if it belongs to another
        job); metrics logged after it are dropped, since those steps run again."""
        state = load_checkpoint(self.job.state_dir)
        if state is None:
            return False
        if state["fingerprint"] != self.job.fingerprint():
            raise ValueError(f"the checkpoint in {self.job.state_dir} is of another job (the adapters or "
                             f"their hyper-parameters changed); remove it or set checkpoint_dir to start over")
        with torch.no_grad():
            self.bank.master.copy_(state["master"])
        self.optim.load_state_dict(state["optim"])
        self.bank.refresh_pool()
        self.step = state["step"]
        self._truncate_metrics()
        return True

    def checkpoint(self) -> str:
        return save_checkpoint(self.job.state_dir, {
            "fingerprint": self.job.fingerprint(), "step": self.step,
            "master": self.bank.master.detach().cpu(), "optim": self.optim.state_dict()})

    def _truncate_metrics(self) -> None:
        path = os.path.join(self.job.state_dir, METRICS)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] < self.step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    # ---- training -----------------------------------------------------------------------------
    def run(self, max_steps: int | None = None, progress: bool = True) -> list[StepLog]:
        """Train until every adapter is done, or for at most `max_steps` steps of this run (then
        checkpoint and return: the job resumes from there). Returns this run's logs."""
        logs: list[StepLog] = []
        stop = self.num_steps if max_steps is None else min(self.num_steps, self.step + max_steps)
        os.makedirs(self.job.state_dir, exist_ok=True)
        start = time.perf_counter()
        with open(os.path.join(self.job.state_dir, METRICS), "a", encoding="utf-8") as metrics, \
                tqdm(total=self.num_steps, initial=self.step, disable=not progress, unit="step") as bar:
            while self.step < stop:
                step_logs = self.train_step()
                logs += step_logs
                metrics.writelines(json.dumps(asdict(s)) + "\n" for s in step_logs)
                metrics.flush()
                finished = [s for s, t in enumerate(self.totals) if t == self.step]
                for s in finished:
                    self.save_adapter(s)
                if finished or self.step % self.job.checkpoint_every == 0 or self.step == stop:
                    self.checkpoint()
                bar.update(1)
                bar.set_postfix(loss=sum(s.loss for s in step_logs) / len(step_logs),
                                tok_s=f"{self.tokens_seen / (time.perf_counter() - start):.0f}")
        return logs

    def train_step(self) -> list[StepLog]:
        """One step of every adapter still training: forward/backward per micro-batch, then clip,
        AdamW and the schedule per adapter."""
        k, num = self.step, len(self.totals)
        active = [s for s in range(num) if k < self.totals[s]]
        rows = [Row(s, self.samples[s][i]) for s in active for i in self.streams[s].batch(k)]
        targets = torch.zeros(num, dtype=torch.float64)
        for r in rows:
            targets[r.slot] += r.sample.num_targets
        denominators = targets.clamp(min=1).to(self.device, torch.float32)
        loss_sums = torch.zeros(num, dtype=torch.float32, device=self.device)
        lrs = {s: self.optim.lr(s) for s in active}
        for mb in micro_batches(rows, self.job.micro_batch_tokens, self.pad_id):
            self.mixed.set_tokens(mb.token_slot)
            logits = self.model(input_ids=mb.input_ids.to(self.device),
                                attention_mask=mb.attention_mask.to(self.device), use_cache=False).logits
            labels = mb.labels[:, 1:].to(self.device)
            per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
            sums = torch.zeros(num, dtype=torch.float32, device=self.device)
            sums.index_add_(0, mb.row_slot.to(self.device), per_token.sum(1))
            (sums / denominators).sum().backward()
            loss_sums += sums.detach()
            self.tokens_seen += int(mb.attention_mask.sum())
        norms = self.optim.step(active)
        self.step += 1
        losses = (loss_sums / denominators).tolist()
        norm_values = torch.stack([norms[s] for s in active]).tolist()
        return [StepLog(k, self.job.adapters[s].name, losses[s], int(targets[s]), g, lrs[s])
                for s, g in zip(active, norm_values)]

    # ---- output -------------------------------------------------------------------------------
    def save_adapter(self, slot: int) -> str:
        """Write adapter `slot` into the output directory in PEFT format, atomically."""
        a = self.job.adapters[slot]
        return write_adapter_atomic(self.job.output_dir, a.name,
                                    peft_config(self.bank.adapters[slot], self.job.base_model),
                                    adapter_tensors(self.bank, slot, self.save_dtype))
