"""Every adapter's LoRA weights of a job in one flat fp32 buffer, and the tables that address it.

Adapter-major: adapter s owns one contiguous span holding, for each layer it targets (model
order), A as r rows of in_features, then B transposed as r rows of out_features. One span per
adapter makes its AdamW state, its gradient norm and its clipping one slice each (per-adapter
optimizer state without per-tensor bookkeeping), and the layers reach their rows through the
kernel contract's row tables (`LoRATables`, absolute addresses into the buffer), so the layers of
one adapter need not be contiguous with each other's rows of other adapters. Spans start at
multiples of 64 elements, so the rows keep the 16-byte alignment the kernels' vector loads want
whenever the feature sizes are multiples of 8.

`grad` has the same layout (the op's gradient sink); `pool` is what the kernels read: the masters
themselves for the torch backend, or their fp16/bf16 copy for the paged one, refreshed after each
optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from slora_plugin.kernels.lora_function import LoRATables

SPAN_ALIGN = 64


@dataclass(frozen=True)
class Placement:
    """One (adapter, layer) pair: element offsets of A's and B^T's first rows, and the shapes."""

    module: str
    a: int
    b: int
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterShape:
    """What the bank needs of an adapter: its rank, alpha and the layers it targets."""

    rank: int
    alpha: float
    modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        """PEFT's scaling (lora_alpha / r; rsLoRA is not offered)."""
        return self.alpha / self.rank


class AdapterBank:
    """The flat master weights, their gradient sink and low-precision pool, and per-layer tables."""

    def __init__(self, layers: Mapping[str, tuple[int, int]], adapters: Sequence[AdapterShape],
                 device: torch.device | str, pool_dtype: torch.dtype | None) -> None:
        """`layers`: name -> (in_features, out_features) of every layer some adapter targets;
        `pool_dtype`: None to let the kernels read the fp32 masters (torch backend)."""
        self.adapters = list(adapters)
        self.placements: list[list[Placement]] = []
        self.spans: list[tuple[int, int]] = []
        pos = 0
        for shape in self.adapters:
            pos = -(-pos // SPAN_ALIGN) * SPAN_ALIGN
            start, placed = pos, []
            for name in shape.modules:
                fin, fout = layers[name]
                placed.append(Placement(name, pos, pos + shape.rank * fin, shape.rank, fin, fout))
                pos += shape.rank * (fin + fout)
            self.placements.append(placed)
            self.spans.append((start, pos))
        self.master = torch.zeros(max(pos, 1), dtype=torch.float32, device=device).requires_grad_()
        self.grad = torch.zeros_like(self.master, requires_grad=False)
        self.pool = self.master if pool_dtype is None else torch.empty_like(self.master, dtype=pool_dtype,
                                                                             requires_grad=False)
        self.tables = {name: self._tables(name) for name in layers}

    def _tables(self, name: str) -> LoRATables:
        num_slots = len(self.adapters)
        found = {s: p for s, placed in enumerate(self.placements) for p in placed if p.module == name}
        max_rank = max(p.rank for p in found.values())
        a_rows = torch.zeros((num_slots, max_rank), dtype=torch.int64)
        b_rows = torch.zeros_like(a_rows)
        ranks = torch.zeros(num_slots, dtype=torch.int32)
        scales = torch.zeros(num_slots, dtype=torch.float32)
        for s, p in found.items():
            k = torch.arange(p.rank)
            a_rows[s, :p.rank] = p.a + k * p.in_features
            b_rows[s, :p.rank] = p.b + k * p.out_features
            ranks[s], scales[s] = p.rank, self.adapters[s].scale
        device = self.master.device
        return LoRATables.build(a_rows.to(device), b_rows.to(device), ranks.to(device), scales.to(device))

    # ---- weights ------------------------------------------------------------------------------
    def a_matrix(self, p: Placement) -> torch.Tensor:
        """A [r, in] of one placement: a view of the masters (no grad)."""
        return self.master.detach()[p.a:p.b].view(p.rank, p.in_features)

    def bt_matrix(self, p: Placement) -> torch.Tensor:
        """B^T [r, out]: a view of the masters (no grad)."""
        return self.master.detach()[p.b:p.b + p.rank * p.out_features].view(p.rank, p.out_features)

    def init_adapter(self, slot: int, seed: int) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0;
        drawn on the CPU from `seed`, so an adapter starts the same on every device."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.placements[slot]:
                bound = 1.0 / math.sqrt(p.in_features)
                self.a_matrix(p).copy_((torch.rand(p.rank, p.in_features, generator=g) * 2 - 1) * bound)
                self.bt_matrix(p).zero_()

    def param(self, slot: int) -> torch.Tensor:
        """The adapter's span of the masters as one optimizer parameter (a leaf view: the
        optimizer updates the masters in place)."""
        start, end = self.spans[slot]
        return self.master.detach()[start:end]

    def grad_of(self, slot: int) -> torch.Tensor:
        """The adapter's span of the gradient sink."""
        start, end = self.spans[slot]
        return self.grad[start:end]

    def refresh_pool(self) -> None:
        """Copy the masters into the kernels' pool (after every optimizer step)."""
        if self.pool is not self.master:
            self.pool.copy_(self.master.detach())
