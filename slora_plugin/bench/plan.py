"""GPU memory plan without a GPU: KV cache vs adapters, for the plugin and for stock vLLM.

Stock vLLM 0.26 reserves LoRA slot buffers apart from the KV cache: for every wrapped module
`max_loras` slots padded to `max_lora_rank`, whatever rank the adapters really have. The plugin
keeps adapters in KV pages, at their real rank, only while they are resident. This module
computes both from a model config, so `slora-plugin bench plan` can show the trade-off on a
machine without a GPU.

Stock slot bytes follow vLLM's `create_lora_weights` (vllm/lora/layers/):
- a fused layer stores one A per slice: qkv_proj holds 3 A's of (max_rank, hidden), gate_up_proj
  2 A's of (max_rank, hidden); B is (out_slice, max_rank) per slice;
- with `lora_target_modules` unset (the default) vLLM also wraps `embed_tokens`
  (A: vocab x rank, B: hidden x rank) and `lm_head` (through the logits processor:
  A: rank x hidden, B: vocab x rank), which are not per layer.
So slot bytes = max_loras * max_lora_rank * dtype_bytes *
(layers * sum over wrapped layers of (n_slices * in + out) + embedding terms).
For Llama-2-7B this gives 2.45 / 19.61 / 4.90 GiB for the baseline's rows c / d / e, against
2.46 / 19.62 / 4.96 GiB measured (the growth of "Model loading took"). A plain
`sum (in + out)` without the per-slice A's and the embeddings gives 16.1 GiB for d: that is why.

The KV budget is estimated as `gpu_gib * gpu_memory_utilization - weights - overhead`; the
overhead default (1.7 GiB: activations, CUDA graphs, non-torch memory) is calibrated on the
baseline's base-model row (57.02 GiB KV on an H100 that torch reports as about 79.19 GiB).
Differences between configurations (slots, adapter pages) are exact; the absolute KV size is an
estimate. Pass `kv_gib` to use the number vLLM logged instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from slora_plugin.adapters.targets import packed_modules
from slora_plugin.layout import MODULES, plan_layout
from slora_plugin.model_config import ModelMemory

GIB = 2**30

#: vLLM's LoRA-wrappable layers of a Llama-style model and their PEFT slices.
STOCK_LAYERS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
EMBEDDING_LAYERS = ("embed_tokens", "lm_head")

#: The baseline's tuned stock setting: only the layers its q,k,v,o adapters touch.
TUNED_STOCK_TARGETS = ("qkv_proj", "o_proj")


class PlanError(ValueError):
    """Bad input to the planner; the message names it."""


def stock_slot_bytes(mem: ModelMemory, max_loras: int, max_lora_rank: int,
                     target_modules: Sequence[str] | None = None) -> int:
    """GPU bytes of stock vLLM's LoRA slot buffers (see the module docstring for the formula).

    `target_modules` is vLLM's `lora_target_modules` (None = every supported layer, including
    embed_tokens and lm_head); PEFT names (q_proj, ...) select their fused vLLM layer.
    """
    if max_loras < 1 or max_lora_rank < 1:
        raise PlanError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_lora_rank}")
    wrapped = _stock_wrapped(target_modules)
    d = mem.dims
    per_layer = 0
    for layer in wrapped & set(STOCK_LAYERS):
        slices = [d.module_io(m) for m in STOCK_LAYERS[layer]]
        per_layer += sum(fin + fout for fin, fout in slices)
    elems = d.num_hidden_layers * per_layer
    elems += sum(mem.vocab_size + d.hidden_size for e in EMBEDDING_LAYERS if e in wrapped)
    return max_loras * max_lora_rank * elems * mem.dtype_bytes


def _stock_wrapped(target_modules: Sequence[str] | None) -> set[str]:
    if target_modules is None:
        return set(STOCK_LAYERS) | set(EMBEDDING_LAYERS)
    known = set(STOCK_LAYERS) | set(EMBEDDING_LAYERS)
    wrapped = set()
    for t in target_modules:
        parents = [layer for layer, kids in STOCK_LAYERS.items() if t in kids]
        if t in known:
            wrapped.add(t)
        elif parents:
            wrapped.update(parents)
        else:
            raise PlanError(f"stock target module {t!r} is not a vLLM Llama LoRA layer "
                            f"{sorted(known)} nor a PEFT slice of one")
    return wrapped


def adapter_ranks_from_dir(adapter_dir: str) -> list[dict[str, int]]:
    """Per-module ranks of every adapter under `adapter_dir` (sorted by name), read from each
    `adapter_config.json` (r, target_modules as a list, rank_pattern upper bounds)."""
    try:
        names = sorted(os.listdir(adapter_dir))
    except OSError as e:
        raise PlanError(f"adapter directory {adapter_dir}: cannot list ({e.strerror})") from None
    out = []
    for name in names:
        path = os.path.join(adapter_dir, name, "adapter_config.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            r = int(cfg["r"])
            targets = cfg["target_modules"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"adapter {name}: {path} is not a PEFT LoRA config ({e})") from None
        if isinstance(targets, str):
            raise PlanError(f"adapter {name}: target_modules is a pattern ({targets!r}); the planner "
                            f"needs an explicit list")
        pattern = cfg.get("rank_pattern") or {}
        ranks = {}
        for m in targets:
            if m in MODULES:
                ranks[m] = max([r] + [int(v) for k, v in pattern.items() if k.endswith(m)])
        out.append(ranks)
    if not out:
        raise PlanError(f"adapter directory {adapter_dir}: no sub-directory has an adapter_config.json")
    return out


def ranks_from_mix(n_adapters: int, ranks: Sequence[int],
                   modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> list[dict[str, int]]:
    """The baseline's mix: adapter j has rank ranks[j % len(ranks)] on every module."""
    if n_adapters < 1 or not ranks:
        raise PlanError(f"need n_adapters >= 1 and a non-empty rank list, got {n_adapters}, {list(ranks)}")
    return [{m: ranks[j % len(ranks)] for m in modules} for j in range(n_adapters)]


@dataclass(frozen=True)
class PlanRow:
    resident: int
    plugin_adapter_bytes: int
    plugin_kv_tokens: int
    stock: dict[str, tuple[int, int]]  # label -> (slot bytes, KV tokens left; -1 = does not fit)


@dataclass(frozen=True)
class Plan:
    model: str
    mem: ModelMemory
    gpu_bytes: float
    utilization: float
    overhead_bytes: float
    kv_budget_bytes: int
    block_size: int
    num_blocks: int
    pages_per_adapter: tuple[int, ...]
    max_lora_rank: int
    stock_targets: dict[str, tuple[str, ...] | None]
    rows: tuple[PlanRow, ...]
    #: vLLM modules the plugin gives LoRA layers with slora.target_modules unset (the ones the
    #: adapters target; see slora_plugin.adapters.targets).
    plugin_targets: tuple[str, ...]


def make_plan(model_cfg: Mapping[str, Any], adapters: Sequence[Mapping[str, int]], *,
              model_name: str = "model", gpu_gib: float = 80.0, utilization: float = 0.9,
              overhead_gib: float = 1.7, kv_gib: float | None = None, block_size: int = 16,
              resident: Sequence[int] = (1, 8, 32, 128, 512),
              stock_targets: Mapping[str, Sequence[str] | None] | None = None) -> Plan:
    """Plugin pages vs stock slots for K resident adapters (K in `resident`, capped at the
    number of adapters, which is always added). Stock uses max_loras = K and max_lora_rank = the
    largest rank among the adapters; `stock_targets` maps a column label to vLLM's
    `lora_target_modules` (default: "stock tuned" = the layers the adapters touch, as the
    baseline's tuned rows set it, and "stock default" = None, vLLM's default)."""
    mem = ModelMemory.from_config(model_cfg)
    if not adapters:
        raise PlanError("no adapters to plan for")
    if block_size < 1:
        raise PlanError(f"block_size must be >= 1, got {block_size}")
    if kv_gib is not None:
        kv_budget = int(kv_gib * GIB)
    else:
        kv_budget = int(gpu_gib * GIB * utilization - mem.weight_bytes - overhead_gib * GIB)
    block_bytes = mem.kv_bytes_per_token * block_size
    if kv_budget < block_bytes:
        raise PlanError(f"no room for a KV cache: {gpu_gib} GiB x {utilization} leaves "
                        f"{kv_budget / GIB:.2f} GiB after weights and overhead")
    num_blocks = kv_budget // block_bytes
    page_elems = mem.page_elems(block_size)
    pages = tuple(plan_layout(a, mem.dims, page_elems).num_pages for a in adapters)
    max_rank = max(max(a.values(), default=0) for a in adapters)
    if max_rank < 1:
        raise PlanError("every adapter has rank 0 on every module")
    if stock_targets is None:
        used = {m for a in adapters for m, r in a.items() if r}
        tuned = tuple(layer for layer, kids in STOCK_LAYERS.items() if used & set(kids))
        stock_targets = {"stock tuned": tuned, "stock default": None}
    targets = {k: (tuple(v) if v is not None else None) for k, v in stock_targets.items()}
    ks = sorted({min(k, len(adapters)) for k in resident if k >= 1} | {len(adapters)})
    rows = []
    for k in ks:
        used = sum(pages[:k])
        plugin_tokens = (num_blocks - used) * block_size if used <= num_blocks else -1
        stock = {}
        for label, tm in targets.items():
            slots = stock_slot_bytes(mem, k, max_rank, tm)
            left = (kv_budget - slots) // block_bytes
            stock[label] = (slots, left * block_size if left > 0 else -1)
        rows.append(PlanRow(k, used * block_bytes, plugin_tokens, stock))
    plugin_targets = packed_modules(m for a in adapters for m, r in a.items() if r)
    return Plan(model_name, mem, gpu_gib * GIB, utilization, overhead_gib * GIB, kv_budget,
                block_size, num_blocks, pages, max_rank, targets, tuple(rows), plugin_targets)


def format_plan(plan: Plan) -> str:
    """A readable report: assumptions first, then one markdown table."""
    mem, d = plan.mem, plan.mem.dims
    block_bytes = mem.kv_bytes_per_token * plan.block_size
    base_tokens = plan.num_blocks * plan.block_size
    by_pages: dict[int, int] = {}
    for p in plan.pages_per_adapter:
        by_pages[p] = by_pages.get(p, 0) + 1
    lines = [
        f"Model {plan.model}: {d.num_hidden_layers} layers, hidden {d.hidden_size}, "
        f"{d.num_attention_heads} heads / {d.num_key_value_heads} KV heads x {d.head_dim}, "
        f"{mem.dtype_bytes}-byte dtype; weights {mem.weight_bytes / GIB:.2f} GiB",
        f"KV budget {plan.kv_budget_bytes / GIB:.2f} GiB = {plan.gpu_bytes / GIB:.2f} GiB x "
        f"{plan.utilization:g} - weights - {plan.overhead_bytes / GIB:.2f} GiB overhead "
        f"(estimate; vLLM's log gives the real one)",
        f"KV {mem.kv_bytes_per_token / 2**20:.3f} MiB/token; one block = {plan.block_size} tokens = "
        f"{block_bytes / 2**20:.2f} MiB = one {mem.page_size_bytes(plan.block_size) // 1024} KiB "
        f"page per layer; {plan.num_blocks} blocks = {base_tokens:,} KV tokens without adapters",
        f"{len(plan.pages_per_adapter)} adapters, pages each: "
        + ", ".join(f"{p} pages ({p * block_bytes / 2**20:.0f} MiB) x{n}" for p, n in sorted(by_pages.items())),
        f"Stock: max_loras = K slots padded to max_lora_rank {plan.max_lora_rank}; lora_target_modules "
        + "; ".join(f"'{k}' {','.join(v) if v else 'unset (every layer + embed_tokens + lm_head)'}"
                    for k, v in plan.stock_targets.items()),
        f"Plugin: LoRA layers on {','.join(plan.plugin_targets)} (the modules the adapters target, "
        f"with slora.target_modules unset)",
        "",
    ]
    labels = list(plan.rows[0].stock) if plan.rows else []
    head = ["resident K", "plugin adapters GiB", "plugin KV tokens"]
    for label in labels:
        head += [f"{label} slots GiB", f"{label} KV tokens"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in plan.rows:
        cells = [f"{row.resident:,}", f"{row.plugin_adapter_bytes / GIB:.2f}", _tokens(row.plugin_kv_tokens)]
        for label in labels:
            slots, tokens = row.stock[label]
            cells += [f"{slots / GIB:.2f}", _tokens(tokens)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("plugin: adapters not resident take no GPU memory, and resident ones are evicted "
                 "when the KV cache needs the pages; stock: the slots are reserved for the "
                 "engine's lifetime, and only K adapters can be on the GPU at once.")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return "does not fit" if n < 0 else f"{n:,}"
