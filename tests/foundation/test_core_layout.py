"""`core_layout.pack_cores` against a row-by-row reference: the one-slice path (K divides the
page, rows back to back) and the indexed path (rows skip a page's tail) give the same pages."""

from __future__ import annotations

import pytest
import torch

from slora_plugin.core_layout import pack_cores, plan_cores

MODULES = ["q_proj", "o_proj", "up_proj"]


def reference(layout, cores, dtype) -> torch.Tensor:
    """Each row written alone at its offset; every other element zero."""
    out = torch.zeros(layout.num_pages * layout.page_elems, dtype=dtype)
    k = layout.rank
    for m, offsets in layout.rows.items():
        core = cores.get(m)
        rows = torch.zeros(len(offsets), k) if core is None else core.reshape(len(offsets), k)
        for o, row in zip(offsets, rows):
            out[o:o + k] = row.to(dtype)
    return out.view(layout.num_pages, layout.page_elems)


@pytest.mark.parametrize("page", [24, 26])  # 24: K divides it (one slice a module); 26: it does not
@pytest.mark.parametrize("diagonal", [False, True])
def test_packed_pages_equal_the_row_by_row_reference(page, diagonal):
    k = 4
    layout = plan_cores(MODULES, k, diagonal, page)
    contiguous = [m for m, offs in layout.rows.items() if offs[-1] - offs[0] == (len(offs) - 1) * k]
    assert (len(contiguous) == 3) == (page % k == 0 or diagonal)  # both paths are exercised
    g = torch.Generator().manual_seed(0)
    cores = {m: torch.randn((k,) if diagonal else (k, k), generator=g, dtype=torch.float64)
             for m in ("q_proj", "up_proj")}  # o_proj: no core in this layer
    out = torch.full((layout.num_pages, page), float("nan"), dtype=torch.float16)
    pack_cores(layout, cores, out)
    want = reference(layout, cores, torch.float16)
    covered = torch.zeros(layout.num_pages * page, dtype=torch.bool)
    for offs in layout.rows.values():
        for o in offs:
            covered[o:o + k] = True
    assert torch.equal(out.view(-1)[covered], want.view(-1)[covered])
    assert out.view(-1)[~covered].isnan().all()  # nothing outside the rows is written


def test_a_core_of_the_wrong_shape_is_refused():
    layout = plan_cores(["q_proj"], 4, False, 16)
    with pytest.raises(ValueError, match="q_proj"):
        pack_cores(layout, {"q_proj": torch.zeros(4, 3)}, torch.zeros(layout.num_pages, 16))
