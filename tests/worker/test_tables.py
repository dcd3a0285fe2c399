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


@pytest.mark.parametrize("diagonal", [False, True])
def test_core_rows_read_back_the_packed_cores_and_a_slot_holds_one_kind(tiny_dims, diagonal):
    from slora_plugin.core_layout import pack_cores, plan_cores
    from slora_plugin.worker.tables import core_rows

    k, page = 6, 32
    layout = plan_cores(["q_proj", "down_proj", "up_proj"], k, diagonal, page)
    g = torch.Generator().manual_seed(0)
    cores = {m: torch.randn(k, generator=g) if diagonal else torch.randn(k, k, generator=g)
             for m in ("q_proj", "up_proj")}  # down_proj: no core in this layer (zero rows)
    packed = torch.zeros(layout.num_pages, page)
    pack_cores(layout, cores, packed)
    blocks = list(range(layout.num_pages + 3))[::-1][: layout.num_pages]
    pool = torch.full((layout.num_pages + 3, page), float("nan"))
    pool[blocks] = packed
    rows = core_rows(layout, blocks, group=2)
    flat = pool.view(-1)
    for m in ("q_proj", "up_proj", "down_proj"):
        i = MODULE_INDEX[m]
        got = torch.stack([flat[a:a + k] for a in rows.core_addr[i].tolist()])
        want = cores.get(m, torch.zeros(k) if diagonal else torch.zeros(k, k)).reshape(got.shape)
        assert rows.has_core[i] == 1 and torch.equal(got, want)
    assert int(rows.has_core.sum()) == 3

    tables = SlotTables(num_slots=2, max_rank=4, device="cpu")
    with pytest.raises(ValueError, match="never enabled"):
        tables.write_cores(0, rows)
    cores_t = tables.enable_cores(k, diagonal)
    plain_layout = plan_layout({"o_proj": 3}, tiny_dims, 256)
    plain = slot_rows(plain_layout, list(range(5, 5 + plain_layout.num_pages)), 4)
    tables.write(0, plain)
    tables.write_cores(0, rows)  # the slot now holds the compressed adapter only
    assert int(tables.ranks[0].sum()) == 0 and int(cores_t.has_core[0].sum()) == 3
    assert int(cores_t.slot_group[0]) == 2 and torch.equal(cores_t.core_addr[0], rows.core_addr)
    tables.write(0, plain)  # and back to the plain one
    assert int(tables.ranks[0].sum()) == 3 and int(cores_t.has_core[0].sum()) == 0
    tables.write_cores(1, rows)
    tables.clear(1)
    assert int(cores_t.has_core.sum()) == 0
    with pytest.raises(ValueError, match="core tables exist"):
        tables.enable_cores(k + 1, diagonal)
