"""The slot tables point at exactly the rows `layout.py` placed, in the blocks given."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_plugin.layout import MODULE_INDEX, MODULES, pack_layer, plan_layout
from slora_plugin.worker.tables import SlotTables, slot_rows

ranks_st = st.dictionaries(st.sampled_from(MODULES), st.integers(0, 8), min_size=1)


@settings(max_examples=30, deadline=None)
@given(ranks=ranks_st, seed=st.integers(0, 2**16))
def test_rows_read_back_the_packed_weights(tiny_dims, ranks, seed):
    page_elems = 256
    layout = plan_layout(ranks, tiny_dims, page_elems)
    g = torch.Generator().manual_seed(seed)
    weights = {m: (torch.randn(pl.rank, pl.in_features, generator=g),
                   torch.randn(pl.out_features, pl.rank, generator=g))
               for m, pl in layout.modules.items()}
    num_blocks = layout.num_pages + 7
    block_ids = torch.randperm(num_blocks, generator=g)[: layout.num_pages].tolist()
    packed = torch.zeros(layout.num_pages, page_elems)
    pack_layer(layout, weights, packed)
    pool = torch.full((num_blocks, page_elems), float("nan"))
    pool[block_ids] = packed
    pool = pool.view(-1)

    rows = slot_rows(layout, block_ids, max_rank=8)
    for m in MODULES:
        i = MODULE_INDEX[m]
        r = layout.modules[m].rank if m in layout.modules else 0
        assert rows.ranks[i] == r
        assert rows.scales[i] == (1.0 if r else 0.0)
        assert torch.all(rows.a_addr[i, r:] == 0) and torch.all(rows.b_addr[i, r:] == 0)
        if r:
            a, b = weights[m]
            idx_a = rows.a_addr[i, :r, None] + torch.arange(a.shape[1])
            idx_b = rows.b_addr[i, :r, None] + torch.arange(b.shape[0])
            torch.testing.assert_close(pool[idx_a], a)
            torch.testing.assert_close(pool[idx_b], b.t())


def test_rank_above_max_and_wrong_page_count_are_refused(tiny_dims):
    layout = plan_layout({"q_proj": 16}, tiny_dims, 256)
    with pytest.raises(ValueError, match="max_lora_rank 8"):
        slot_rows(layout, list(range(layout.num_pages)), max_rank=8)
    with pytest.raises(ValueError, match="needs"):
        slot_rows(layout, [0], max_rank=16)


def test_tables_write_and_clear(tiny_dims):
    layout = plan_layout({"o_proj": 4, "down_proj": 2}, tiny_dims, 256)
    rows = slot_rows(layout, list(range(3, 3 + layout.num_pages)), max_rank=4)
    t = SlotTables(num_slots=3, max_rank=4, device="cpu")
    t.write(1, rows)
    assert torch.equal(t.a_addr[1], rows.a_addr) and torch.equal(t.ranks[1], rows.ranks)
    assert int(t.ranks[0].sum()) == 0 and int(t.ranks[2].sum()) == 0
    t.clear(1)
    assert int(t.ranks.sum()) == 0 and int(t.a_addr.abs().sum()) == 0
    with pytest.raises(IndexError):
        t.write(3, rows)
