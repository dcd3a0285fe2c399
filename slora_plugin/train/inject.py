"""LoRA layers in a frozen transformers model: each targeted `nn.Linear` is replaced by a
`MultiLoRALinear` that applies, to every token, the adapter of the sequence it belongs to.

Which adapter each token has is per micro-batch state shared by every layer (`MixedBatch`):
set once before the forward (`set_tokens`), read by every layer's forward and, through the op's
saved context, by its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slora_plugin.kernels.lora_function import Backend, LoRATables, TokenSlots, multi_lora
from slora_plugin.train.bank import AdapterBank


class MixedBatch:
    """The bank, the backend, and the current micro-batch's token slots."""

    def __init__(self, bank: AdapterBank, backend: Backend) -> None:
        self.bank, self.backend = bank, backend
        self.slots: TokenSlots | None = None

    def set_tokens(self, token_slot: torch.Tensor) -> None:
        """Token t of the next forward (its inputs flattened) gets adapter `token_slot[t]`, -1 none."""
        self.slots = self.backend.prepare(token_slot)


class MultiLoRALinear(nn.Module):
    """base(x) + LoRA of each token's adapter; the base layer stays frozen and unchanged."""

    def __init__(self, base: nn.Linear, tables: LoRATables, batch: MixedBatch) -> None:
        super().__init__()
        self.base, self.tables, self.batch = base, tables, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, self.base.weight, self.base.bias)  # a fresh [T, N]: the op adds into it
        bank = self.batch.bank
        y = multi_lora(y, x2, bank.master, bank.pool, self.tables, self.batch.slots, bank.grad)
        return y.view(*lead, y.shape[-1])


def inject(model: nn.Module, batch: MixedBatch) -> None:
    """Replace every layer the bank has tables for by its `MultiLoRALinear`."""
    for name, tables in batch.bank.tables.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not nn.Linear")
        setattr(parent, child, MultiLoRALinear(base, tables, batch))
