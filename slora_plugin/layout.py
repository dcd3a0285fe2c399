"""Where an adapter's weights sit inside vLLM KV pages: one pure function for everyone.

The scheduler needs only `num_pages` (how many KV blocks an adapter takes); the host store packs
weights into pages with it; the worker turns its row offsets into the kernels' row-address
tables. All three must agree bit for bit, so the layout is computed here and nowhere else.

Model of a page. In vLLM 0.26 a KV block id is one contiguous `page_size_bytes` slice of *each*
layer's KV tensor (blocks-first layout). An adapter that holds block ids P[0..n) owns, in every
layer l, the slices P[i] of layer l's KV tensor. Layer l's A/B weights go into layer l's slices,
so one page table serves every layer, and the row offsets below are the same in every layer.

Inside its pages an adapter is a set of *rows*, viewed in the serving dtype:
  - module m's A (r_m x in_m) is stored as its r_m rows of length in_m;
  - module m's B (out_m x r_m) is stored transposed, as r_m rows of length out_m,
so both the shrink (x @ A^T) and the expand (h @ B^T) kernels read whole contiguous rows.
A row never straddles a page, so the kernel can address it with one base offset. Rows are
placed first-fit over the pages; there is no padding to a maximum rank, and the leftover
space at the end of pages is reported as waste.

Offsets are *adapter-local*: `page_index * page_elems + offset_in_page`. The physical element
address of a row in a layer's pool viewed as `(num_blocks, page_elems)` is
`block_ids[local // page_elems] * page_elems + local % page_elems` (see `physical_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

#: PEFT module names the plugin understands, in the canonical order used for packing and for
#: the kernels' module index.
MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_INDEX: dict[str, int] = {m: i for i, m in enumerate(MODULES)}

#: vLLM's fused layers and the PEFT modules that are their slices, in output order.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LayoutError(ValueError):
    """The adapter cannot be laid out in this page size."""


@dataclass(frozen=True)
class ModelDims:
    """What the layout needs of the base model (TP-local sizes for tensor parallel)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_hidden_layers: int
    tp_size: int = 1

    @classmethod
    def from_hf_config(cls, hf_config: object, tp_size: int = 1) -> "ModelDims":
        """Read a transformers config (or anything with the same attributes). A composite
        config (e.g. a vision-language model's) is read through its `get_text_config()`, the
        decoder whose layers get LoRA. The one way the package derives model dimensions: the
        scheduler's and the worker's adapter stores (`pool/adapter_pages.engine_store`) and the
        engine-args hook all come here, so they cannot disagree."""
        if hasattr(hf_config, "get_text_config"):
            hf_config = hf_config.get_text_config()
        heads = int(getattr(hf_config, "num_attention_heads"))
        hidden = int(getattr(hf_config, "hidden_size"))
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate_size=int(getattr(hf_config, "intermediate_size")),
            num_hidden_layers=int(getattr(hf_config, "num_hidden_layers")),
            tp_size=tp_size,
        )

    def module_io(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a PEFT module on one TP rank."""
        if self.tp_size != 1:
            raise LayoutError("tensor-parallel size > 1 is not supported yet")
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        table = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        try:
            return table[module]
        except KeyError:
            raise LayoutError(f"unknown module {module!r}; supported: {list(MODULES)}") from None

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one decoder layer's seven linear modules."""
        return sum(i * o for i, o in (self.module_io(m) for m in MODULES))

    @property
    def kv_elems_per_token(self) -> int:
        """KV-cache elements one token holds over all layers (K and V)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class ModulePlacement:
    """Where one module's rows are, as adapter-local element offsets."""

    module: str
    rank: int
    in_features: int
    out_features: int
    a_rows: tuple[int, ...]  # r offsets; row k holds A[k, :in_features]
    b_rows: tuple[int, ...]  # r offsets; row k holds B[:out_features, k]


@dataclass(frozen=True)
class PageLayout:
    """The layout of one adapter in one layer's pages (identical in every layer)."""

    page_elems: int
    num_pages: int
    modules: Mapping[str, ModulePlacement]
    used_elems: int

    @property
    def wasted_elems(self) -> int:
        return self.num_pages * self.page_elems - self.used_elems

    @property
    def waste_fraction(self) -> float:
        total = self.num_pages * self.page_elems
        return self.wasted_elems / total if total else 0.0


def plan_layout(ranks: Mapping[str, int], dims: ModelDims, page_elems: int) -> PageLayout:
    """Lay out an adapter whose module `m` has rank `ranks[m]` (modules absent or 0: no LoRA).

    `page_elems` is the page size in serving-dtype elements (`page_size_bytes // itemsize`).
    """
    if page_elems <= 0:
        raise LayoutError(f"page size must be positive, got {page_elems} elements")
    for m in ranks:
        if m not in MODULE_INDEX:
            raise LayoutError(f"unknown module {m!r}; supported: {list(MODULES)}")
    free: list[int] = []  # free elements left in each page, by page index
    placements: dict[str, ModulePlacement] = {}
    used = 0

    def place(length: int) -> int:
        if length > page_elems:
            raise LayoutError(
                f"a weight row of {length} elements does not fit in a KV page of {page_elems} "
                f"elements; raise vLLM's --block-size so that one block holds a row")
        for p, room in enumerate(free):
            if room >= length:
                free[p] -= length
                return p * page_elems + (page_elems - room)
        free.append(page_elems - length)
        return (len(free) - 1) * page_elems

    for m in MODULES:
        r = int(ranks.get(m, 0))
        if r < 0:
            raise LayoutError(f"{m}: rank must be >= 0, got {r}")
        if r == 0:
            continue
        fin, fout = dims.module_io(m)
        a = tuple(place(fin) for _ in range(r))
        b = tuple(place(fout) for _ in range(r))
        used += r * (fin + fout)
        placements[m] = ModulePlacement(m, r, fin, fout, a, b)
    return PageLayout(page_elems=page_elems, num_pages=len(free), modules=placements,
                      used_elems=used)


def pack_layer(layout: PageLayout, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               out: torch.Tensor) -> None:
    """Write one layer's (A, B) pairs into `out`, a (num_pages, page_elems) tensor.

    `weights[m] = (A (r, in), B (out, r))` as in PEFT; they are cast to `out.dtype`.
    """
    if out.shape != (layout.num_pages, layout.page_elems):
        raise ValueError(f"out must be {(layout.num_pages, layout.page_elems)}, got {tuple(out.shape)}")
    flat = out.view(-1)
    for m, pl in layout.modules.items():
        a, b = weights[m]
        if tuple(a.shape) != (pl.rank, pl.in_features) or tuple(b.shape) != (pl.out_features, pl.rank):
            raise ValueError(f"{m}: expected A {(pl.rank, pl.in_features)} and B "
                             f"{(pl.out_features, pl.rank)}, got {tuple(a.shape)} and {tuple(b.shape)}")
        a_idx = _row_index(pl.a_rows, pl.in_features)
        b_idx = _row_index(pl.b_rows, pl.out_features)
        flat[a_idx] = a.to(out.dtype)
        flat[b_idx] = b.t().to(out.dtype)


def unpack_layer(layout: PageLayout, pages: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `pack_layer`: read every module's (A, B) back out of the pages."""
    flat = pages.reshape(-1)
    result = {}
    for m, pl in layout.modules.items():
        a = flat[_row_index(pl.a_rows, pl.in_features)]
        bt = flat[_row_index(pl.b_rows, pl.out_features)]
        result[m] = (a.clone(), bt.t().clone())
    return result


def _row_index(rows: Sequence[int], length: int) -> torch.Tensor:
    """(len(rows), length) flat element indices of the given rows."""
    base = torch.tensor(rows, dtype=torch.int64).unsqueeze(1)
    return base + torch.arange(length, dtype=torch.int64).unsqueeze(0)


def physical_rows(local_rows: Iterable[int] | torch.Tensor, block_ids: Sequence[int] | torch.Tensor,
                  page_elems: int) -> torch.Tensor:
    """Adapter-local row offsets -> element addresses in a layer pool viewed as (blocks, page_elems)."""
    local = torch.as_tensor(list(local_rows) if not isinstance(local_rows, torch.Tensor) else local_rows,
                            dtype=torch.int64)
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    return blocks[local // page_elems] * page_elems + local % page_elems


def pages_needed(ranks: Mapping[str, int], dims: ModelDims, page_elems: int) -> int:
    """The scheduler's question: how many KV blocks does this adapter hold?"""
    return plan_layout(ranks, dims, page_elems).num_pages
