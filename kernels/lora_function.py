"""The multi-adapter LoRA op of training (mLoRA's BatchLoRA) as a `torch.autograd.Function`.

    y[t] += s_a * (x[t] A_a^T) B_a^T      a = the adapter of token t (slot -1: none)

Every token of one batch may belong to a different adapter of a different rank. The weights are
rows of one flat fp32 *master* buffer (A: r rows of length K, B^T: r rows of length N), addressed
through the kernel contract's row tables (docs/DESIGN.md), so one table layout serves the forward,
grad x and the weight gradients, and the gradient buffer has the masters' layout.

Backward: grad x of the LoRA path (the base linear's part comes from torch); grad A and grad B^T
per adapter as segmented GEMMs over the adapter's tokens, added into `grad_sink` (a flat fp32
buffer of the masters' layout) when given, else returned as the master's gradient. The sink
exists because every LoRA layer reads the same flat master: returned, each layer's gradient would
be a full-size tensor that autograd allocates and adds (one per layer); written into the sink it
is only the layer's rows (Megatron-LM's gradient-accumulation fusion writes `main_grad` the same
way). The returned form is what `torch.autograd.gradcheck` checks.

Two backends compute the same thing:
- `TorchBackend`: `train_reference.py`, any float dtype, pool = the masters themselves (CPU
  training in fp32, fp64 gradcheck, the oracle of the other one).
- `PagedBackend`: the serving kernels (`shrink.py`, `expand.py`) for the forward and for grad x, the new
  `lora_grad.segmented_lora_grad` for the weight gradients, fp16/bf16 activations.

How the training op relates to the serving kernels (the choice, also in kernels/NOTES.md):
(a) forward and grad x through the paged shrink/expand kernels, on a pool that is the fp32
masters cast to the activation dtype once per optimizer step; or (b) a separate segmented Triton
path on dense per-adapter weights, sharing only `SegmentMeta`. (a) is used:
- the forward *is* the serving op (same kernels, same bf16 weight rounding, same fp32
  accumulation): a loss measured in training is the loss of the adapter as the server runs it;
- grad x needs no kernel of its own: dx = s (dy B) A is a shrink that reads the B^T rows (length
  N) as its "A" rows and an expand that reads the A rows (length K) as its "B^T" rows, i.e. the
  same two kernels with the a/b tables swapped ("the same gather in transpose");
- only the weight gradients need a new kernel: a reduction over a segment's tokens is another
  loop nest than the per-token rows the paged kernels compute;
- its cost is the cast of the masters (`AdapterBank.refresh_pool`): one elementwise kernel per
  step over the trainable parameters, e.g. 64 rank-16 q/v adapters of Llama-2-7B = 537 M
  parameters, ~3 GB read+written, ~1 ms on an H100 against a step of seconds, and 2 bytes per
  trainable parameter on top of the 16 of master + grad + AdamW moments. (b) would have saved
  that and allowed tiles tuned for training; the prefill config (64-token tiles) is already tuned
  for 4,096-token prefill, the shape of a training micro-batch.
The rows live in a plain flat pool, not vLLM KV pages: training runs outside vLLM. Training always
uses the prefill config: it never splits K, so the shrink's h holds whole sums and the weight
gradient reads it as is (the decode config's split leaves partials that only the expand adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from slora_plugin.kernels.lora_grad import GradConfig, segmented_lora_grad
from slora_plugin.kernels.expand import paged_lora_expand
from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.kernels.shrink import paged_lora_shrink, shrink_buffer
from slora_plugin.kernels.tiling import KernelConfig, prefill_config
from slora_plugin.kernels.train_reference import lora_backward_ref, lora_forward_ref, slot_groups
from slora_plugin.layout import MODULES

#: The module column of the tables a training layer uses (one linear layer = one module).
MODULE = 0


@dataclass(frozen=True)
class LoRATables:
    """One LoRA-wrapped linear layer's view of the adapters, in the kernel contract's shapes:
    `a_addr`/`b_addr` int64 [S, 7, R] (every module column aliases column 0: an expanded
    [S, 1, R]), `ranks` int32 / `scales` fp32 [S, 7] (column 0; 0 = the adapter skips the layer)."""

    a_addr: torch.Tensor
    b_addr: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    max_rank: int

    @classmethod
    def build(cls, a_rows: torch.Tensor, b_rows: torch.Tensor, ranks: torch.Tensor,
              scales: torch.Tensor) -> "LoRATables":
        """From per-slot rows: a_rows/b_rows int64 [S, R] (element addresses of A rows / B^T rows
        in the pool, entries past a slot's rank ignored), ranks [S], scales [S]."""
        num_slots, max_rank = a_rows.shape
        if b_rows.shape != a_rows.shape or ranks.shape != (num_slots,) or scales.shape != (num_slots,):
            raise ValueError(f"a_rows/b_rows must be [S, R] and ranks/scales [S], got {tuple(a_rows.shape)}, "
                             f"{tuple(b_rows.shape)}, {tuple(ranks.shape)}, {tuple(scales.shape)}")
        if max_rank < 1 or int(ranks.max()) > max_rank:
            raise ValueError(f"ranks {ranks.tolist()} need 1..{max_rank} table rows")
        wide = (num_slots, len(MODULES), max_rank)
        cols = torch.zeros((num_slots, len(MODULES)), dtype=torch.int32, device=a_rows.device)
        cols[:, MODULE] = ranks.to(cols)
        scale_cols = torch.zeros(cols.shape, dtype=torch.float32, device=a_rows.device)
        scale_cols[:, MODULE] = scales.to(scale_cols)
        return cls(a_addr=a_rows.to(torch.int64).contiguous()[:, None, :].expand(wide),
                   b_addr=b_rows.to(torch.int64).contiguous()[:, None, :].expand(wide),
                   ranks=cols, scales=scale_cols, max_rank=max_rank)


class Backend(Protocol):
    """What `MultiLoRAFunction` asks of a backend."""

    def prepare(self, token_slot: torch.Tensor) -> "TokenSlots": ...

    def forward(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, tables: LoRATables,
                slots: "TokenSlots") -> torch.Tensor | None: ...

    def backward(self, dy: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, saved: torch.Tensor | None,
                 tables: LoRATables, slots: "TokenSlots", grad_pool: torch.Tensor | None,
                 need_dx: bool) -> torch.Tensor | None: ...


@dataclass
class TokenSlots:
    """One micro-batch's adapter slot per token, prepared once by a backend for every LoRA layer
    of its forward and backward (so it must stay untouched until the backward has run)."""

    backend: Backend
    num_tokens: int
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # TorchBackend
    meta: SegmentMeta | None = None                                        # PagedBackend
    max_segment_len: int = 0


class TorchBackend:
    """`train_reference.py`: any float dtype, CPU or GPU, the pool is the masters themselves."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def prepare(self, token_slot: torch.Tensor) -> TokenSlots:
        token_slot = token_slot.to(self.device)
        return TokenSlots(self, token_slot.numel(), groups=slot_groups(token_slot))

    def forward(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, tables: LoRATables,
                slots: TokenSlots) -> None:
        lora_forward_ref(y, x, pool, slots.groups, tables.a_addr, tables.b_addr, tables.ranks, tables.scales, MODULE)
        return None

    def backward(self, dy: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, saved: torch.Tensor | None,
                 tables: LoRATables, slots: TokenSlots, grad_pool: torch.Tensor | None,
                 need_dx: bool) -> torch.Tensor | None:
        return lora_backward_ref(dy, x, pool, slots.groups, tables.a_addr, tables.b_addr, tables.ranks,
                                 tables.scales, MODULE, grad_pool, need_dx)


class PagedBackend:
    """The serving kernels (forward, grad x) + `segmented_lora_grad` (weight gradients); fp16/bf16
    activations, the pool is the masters cast to that dtype, gradients fp32."""

    def __init__(self, num_slots: int, device: torch.device | str, grad_config: GradConfig | None = None) -> None:
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.grad_config = grad_config or GradConfig()
        self._meta: SegmentMeta | None = None

    def prepare(self, token_slot: torch.Tensor) -> TokenSlots:
        """`token_slot` on the host (the trainer built it there): the longest segment, which sizes
        the weight-gradient grid, is counted without a device sync."""
        host = token_slot.cpu()
        t = host.numel()
        if self._meta is None or self._meta.max_tokens < t:  # grown rarely: the buffers are sized by T
            self._meta = SegmentMeta(max_tokens=max(t, 1), max_slots=self.num_slots, device=self.device)
        self._meta.update(host.to(device=self.device, dtype=torch.int32))
        live = host[host >= 0].long()
        longest = int(torch.bincount(live).max()) if live.numel() else 0
        return TokenSlots(self, t, meta=self._meta, max_segment_len=longest)

    @staticmethod
    def config(in_features: int, tables: LoRATables) -> KernelConfig:
        """The prefill config: no K split, so h is whole for the weight gradient (module docstring)."""
        return prefill_config(in_features, tables.max_rank)

    def forward(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, tables: LoRATables,
                slots: TokenSlots) -> torch.Tensor:
        config, r = self.config(x.shape[1], tables), tables.max_rank
        h = shrink_buffer(x.shape[0], 1, r, config, x.device)
        paged_lora_shrink(h, x, pool, slots.meta, tables.a_addr, tables.ranks, (MODULE,), r, config)
        paged_lora_expand(y, h, pool, slots.meta, tables.b_addr, tables.ranks, tables.scales, (MODULE,),
                          (y.shape[1],), r, config)
        return h

    def backward(self, dy: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, saved: torch.Tensor | None,
                 tables: LoRATables, slots: TokenSlots, grad_pool: torch.Tensor | None,
                 need_dx: bool) -> torch.Tensor | None:
        config, r, meta = self.config(x.shape[1], tables), tables.max_rank, slots.meta
        g = shrink_buffer(x.shape[0], 1, r, config, x.device)           # g = dy B: B^T rows read as "A"
        paged_lora_shrink(g, dy, pool, meta, tables.b_addr, tables.ranks, (MODULE,), r, config)
        dx = None
        if need_dx:                                                     # dx = s g A: A rows read as "B^T"
            dx = torch.zeros_like(x)
            paged_lora_expand(dx, g, pool, meta, tables.a_addr, tables.ranks, tables.scales, (MODULE,),
                              (x.shape[1],), r, config)
        if grad_pool is not None:
            for p, q, rows in ((g, x, tables.a_addr), (saved, dy, tables.b_addr)):
                segmented_lora_grad(grad_pool, p[0, :, 0], q, meta, rows, tables.ranks, tables.scales, MODULE,
                                    r, slots.max_segment_len, self.grad_config)
        return dx


class MultiLoRAFunction(torch.autograd.Function):
    """y (the base layer's output, modified in place) += LoRA(x) per token's adapter."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, master: torch.Tensor, pool: torch.Tensor,
                tables: LoRATables, slots: TokenSlots, grad_sink: torch.Tensor | None) -> torch.Tensor:
        saved = slots.backend.forward(y, x, pool, tables, slots)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, pool, saved)
        ctx.tables, ctx.slots, ctx.grad_sink = tables, slots, grad_sink
        ctx.master_spec = (master.shape, master.dtype, master.device)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, pool, saved = ctx.saved_tensors
        grad_pool = ctx.grad_sink
        if grad_pool is None and ctx.needs_input_grad[2]:
            shape, dtype, device = ctx.master_spec
            grad_pool = torch.zeros(shape, dtype=dtype, device=device)
        dx = ctx.slots.backend.backward(dy, x, pool, saved, ctx.tables, ctx.slots, grad_pool,
                                        ctx.needs_input_grad[1])
        return dy, dx, grad_pool if ctx.grad_sink is None else None, None, None, None, None


def multi_lora(y: torch.Tensor, x: torch.Tensor, master: torch.Tensor, pool: torch.Tensor, tables: LoRATables,
               slots: TokenSlots, grad_sink: torch.Tensor | None = None) -> torch.Tensor:
    """y [T, N] += s (x A^T) B^T per token's adapter (in place; returns y for autograd).

    x [T, K]; `master` the flat fp32 (fp64 in gradcheck) weights, requiring grad (it is also what
    makes the output require grad when neither x nor y does, as in the first layer of a frozen
    base); `pool` the weights the backend reads (the master itself for `TorchBackend`, its
    fp16/bf16 copy for `PagedBackend`); `slots` from `backend.prepare(token_slot)`; with
    `grad_sink` the weight gradients are added into it and the master gets none from autograd.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] != slots.num_tokens:
        raise ValueError(f"x [T, K] and y [T, N] must have the T={slots.num_tokens} tokens of the slots, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    return MultiLoRAFunction.apply(y, x, master, pool, tables, slots, grad_sink)
