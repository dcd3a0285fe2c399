"""Test helper: an adapter's raw host form -> its pages, by the page writer (the Triton kernel,
interpreted on CPU) or by its torch reference. Importable as `raw_pages` from any test folder."""

from __future__ import annotations

import torch

from slora_plugin.kernels.page_writer import write_pages, write_pages_ref, writer_plan
from slora_plugin.layout import PageLayout
from slora_plugin.raw_format import RawAdapter


def render_pages(raw: RawAdapter, layout: PageLayout, kernel: bool = True,
                 fill: float = float("nan")) -> torch.Tensor:
    """(num_layers, num_pages, page_elems): every layer's pages written at block ids 0..n-1 of
    pools that start as `fill` (NaN: anything the writer leaves unwritten shows)."""
    rl = raw.layout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pools = [torch.full((layout.num_pages * layout.page_elems,), fill, dtype=rl.dtype, device=device)
             for _ in range(rl.num_layers)]
    blocks = list(range(layout.num_pages))
    if kernel:
        plan = writer_plan(layout, rl)
        table = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
        write_pages(table, raw.buffer.to(device), rl, plan.jobs.to(device), plan.rows.to(device),
                    plan.block_r, plan.block_c, torch.tensor(blocks, dtype=torch.int64, device=device),
                    0, rl.num_layers, layout.page_elems)
    else:
        write_pages_ref(pools, raw.records(), rl, layout, blocks)
    return torch.stack(pools).view(rl.num_layers, layout.num_pages, layout.page_elems).cpu()
