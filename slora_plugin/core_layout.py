"""Where a compressed adapter's cores sit inside KV pages (the counterpart of `layout.plan_layout`).

A compressed adapter (`slora_plugin/compress/`) holds, per module it adapts, its core: K rows
of K elements (one row, the diagonal, for diagonal cores), identical placement in every layer like
an uncompressed adapter's rows (a layer it does not adapt gets zero rows). Rows never straddle a page, so the kernel
addresses each with one element offset (`kernels/compressed_lora.py`: `core_addr[s, m, i]`);
offsets are adapter-local (`page * page_elems + offset`) and become pool addresses through
`layout.physical_rows`, exactly as for the paged kernels. Pure torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from slora_plugin.layout import MODULE_INDEX, LayoutError


@dataclass(frozen=True)
class CoreLayout:
    """`rows[m]`: adapter-local offsets of module m's core rows; `num_pages` pages in all."""

    rank: int
    diagonal: bool
    page_elems: int
    num_pages: int
    rows: Mapping[str, tuple[int, ...]]


def plan_cores(modules: Sequence[str], rank: int, diagonal: bool, page_elems: int) -> CoreLayout:
    """Rows of `rank` elements, `page_elems // rank` per page, modules in `layout.MODULES` order."""
    if rank > page_elems:
        raise LayoutError(f"a core row of {rank} elements does not fit in a KV page of {page_elems} elements")
    per_page = page_elems // rank
    ordered = sorted(modules, key=lambda m: MODULE_INDEX[m])
    rows: dict[str, tuple[int, ...]] = {}
    n = 0
    for m in ordered:
        count = 1 if diagonal else rank
        rows[m] = tuple((i // per_page) * page_elems + (i % per_page) * rank for i in range(n, n + count))
        n += count
    return CoreLayout(rank, diagonal, page_elems, -(-n // per_page), rows)


def pack_cores(layout: CoreLayout, cores: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    """Write one layer's cores (module -> (K, K), or (K,) diagonal; modules absent in this layer
    get zero rows) into `out`, a (num_pages, page_elems) tensor, cast to its dtype."""
    if out.shape != (layout.num_pages, layout.page_elems):
        raise ValueError(f"out must be {(layout.num_pages, layout.page_elems)}, got {tuple(out.shape)}")
    flat = out.view(-1)
    k = layout.rank
    for m, offsets in layout.rows.items():
        core = cores.get(m)
        shape = (k,) if layout.diagonal else (k, k)
        if core is not None and tuple(core.shape) != shape:
            raise ValueError(f"{m}: expected a core of shape {shape}, got {tuple(core.shape)}")
        n = len(offsets)
        if offsets[-1] - offsets[0] == (n - 1) * k:
            # rows are increasing and never overlap, so this span holds exactly them, back to
            # back (always so when K divides the page): one slice copy, no index tensor
            span = flat[offsets[0]:offsets[0] + n * k]
            if core is None:
                span.zero_()
            else:
                span.copy_(core.reshape(-1))
            continue
        rows = torch.zeros(n, k, dtype=out.dtype, device=out.device) if core is None \
            else core.reshape(n, k).to(out.dtype)
        index = (torch.tensor(offsets, dtype=torch.int64, device=out.device)[:, None]
                 + torch.arange(k, device=out.device))
        flat[index] = rows
