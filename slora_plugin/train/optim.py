"""Per-adapter optimization: AdamW with one parameter group per adapter (its span of the masters,
so its moments and step count are its own), a learning-rate schedule each, and gradient clipping
by each adapter's own norm (one adapter's large gradient must not shrink another's step).

The formulas are torch's AdamW and transformers' schedules, so an adapter trained in a mixed
batch follows the same trajectory as one trained alone with PEFT and those (the equivalence test).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from slora_plugin.train.bank import AdapterBank
from slora_plugin.train.job import AdapterJob


def schedule(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier at a step: linear warm-up, then constant, linear decay to 0, or half a cosine
    to 0 (transformers' get_{constant,linear,cosine}_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


class AdapterOptimizer:
    """AdamW + schedules + clipping for every adapter of a bank."""

    def __init__(self, bank: AdapterBank, jobs: Sequence[AdapterJob], totals: Sequence[int],
                 betas: tuple[float, float], eps: float) -> None:
        self.bank, self.jobs = bank, list(jobs)
        self.params = [bank.param(s) for s in range(len(jobs))]
        groups = [{"params": [p], "lr": j.lr, "weight_decay": j.weight_decay} for p, j in zip(self.params, jobs)]
        self.optimizer = torch.optim.AdamW(groups, betas=betas, eps=eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [schedule(j.lr_scheduler, j.warmup_steps, t) for j, t in zip(jobs, totals)])

    def lr(self, slot: int) -> float:
        return self.optimizer.param_groups[slot]["lr"]

    def step(self, active: Sequence[int]) -> dict[int, torch.Tensor]:
        """Clip and step the `active` adapters (the others keep weights and moments), advance the
        schedules, clear the gradient sink and refresh the kernels' pool. Returns each active
        adapter's gradient norm before clipping (device tensors: no sync here)."""
        live = set(active)
        for s, p in enumerate(self.params):
            p.grad = self.bank.grad_of(s) if s in live else None  # AdamW skips params without grad
        norms = {}
        for s in active:
            max_norm = self.jobs[s].max_grad_norm
            grad = self.params[s].grad
            norms[s] = torch.nn.utils.clip_grad_norm_([self.params[s]], max_norm) if max_norm else grad.norm()
        self.optimizer.step()
        self.scheduler.step()
        self.bank.grad.zero_()
        self.bank.refresh_pool()
        return norms

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
