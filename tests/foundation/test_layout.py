"""The page layout: rows never straddle a page, nothing overlaps, packing round-trips exactly."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_plugin.layout import (MODULES, LayoutError, ModelDims, pack_layer, pages_needed,
                                 physical_rows, plan_layout, unpack_layer)

LLAMA2_7B = ModelDims(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                      intermediate_size=11008, num_hidden_layers=32)
#: One fp16 KV block of Llama-2-7B (block 16): 2 * 16 * 32 * 128 elements.
LLAMA2_PAGE = 2 * 16 * 32 * 128

ranks_st = st.dictionaries(st.sampled_from(MODULES), st.integers(0, 24), min_size=1)


def _intervals(layout):
    for pl in layout.modules.values():
        yield from ((o, pl.in_features) for o in pl.a_rows)
        yield from ((o, pl.out_features) for o in pl.b_rows)


@settings(max_examples=60, deadline=None)
@given(ranks=ranks_st, page_elems=st.sampled_from([128, 200, 512, 1000]))
def test_rows_fit_pages_and_never_overlap(tiny_dims, ranks, page_elems):
    layout = plan_layout(ranks, tiny_dims, page_elems)
    spans = sorted(_intervals(layout))
    for start, length in spans:
        assert start // page_elems == (start + length - 1) // page_elems, "row straddles a page"
        assert start + length <= layout.num_pages * page_elems
    for (s0, l0), (s1, _) in zip(spans, spans[1:]):
        assert s0 + l0 <= s1, "rows overlap"
    expected_used = sum(r * sum(tiny_dims.module_io(m)) for m, r in ranks.items())
    assert layout.used_elems == sum(length for _, length in spans) == expected_used
    assert 0 <= layout.wasted_elems < layout.num_pages * page_elems or layout.num_pages == 0


@settings(max_examples=40, deadline=None)
@given(ranks=ranks_st, page_elems=st.sampled_from([128, 320, 1024]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_pack_unpack_round_trip(tiny_dims, ranks, page_elems, seed, dtype):
    layout = plan_layout(ranks, tiny_dims, page_elems)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for m, pl in layout.modules.items():
        weights[m] = (torch.randn(pl.rank, pl.in_features, generator=g).to(dtype),
                      torch.randn(pl.out_features, pl.rank, generator=g).to(dtype))
    pages = torch.full((layout.num_pages, page_elems), float("nan"), dtype=dtype)
    pack_layer(layout, weights, pages)
    back = unpack_layer(layout, pages)
    assert back.keys() == weights.keys()
    for m, (a, b) in weights.items():
        assert torch.equal(back[m][0], a) and torch.equal(back[m][1], b)


def test_physical_rows_follow_the_page_table(tiny_dims):
    layout = plan_layout({"q_proj": 3, "down_proj": 5}, tiny_dims, 256)
    block_ids = list(range(100, 100 + layout.num_pages))
    random.Random(0).shuffle(block_ids)
    rows = layout.modules["down_proj"].b_rows
    phys = physical_rows(rows, block_ids, 256)
    for local, addr in zip(rows, phys.tolist()):
        assert addr == block_ids[local // 256] * 256 + local % 256


def test_no_rank_padding_llama2_qkvo():
    """Rank r on q,k,v,o of Llama-2-7B needs exactly r/8 pages (32 rows of 4096 per page)."""
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    for r in (8, 16, 32, 64, 128):
        layout = plan_layout({m: r for m in qkvo}, LLAMA2_7B, LLAMA2_PAGE)
        assert layout.num_pages == r // 4 and layout.wasted_elems == 0
    assert pages_needed({"q_proj": 8}, LLAMA2_7B, LLAMA2_PAGE) == 1


def test_first_fit_fills_gaps_left_by_long_rows():
    """MLP rows of 11008 leave gaps in pages that 4096-long rows fill."""
    layout = plan_layout({m: 16 for m in MODULES}, LLAMA2_7B, LLAMA2_PAGE)
    assert layout.waste_fraction < 0.05


def test_row_longer_than_page_is_a_clear_error(tiny_dims):
    with pytest.raises(LayoutError, match="raise vLLM's --block-size"):
        plan_layout({"gate_proj": 1}, tiny_dims, 32)


def test_unknown_module_is_an_error(tiny_dims):
    with pytest.raises(LayoutError, match="unknown module 'lm_head'"):
        plan_layout({"lm_head": 4}, tiny_dims, 1024)


def test_model_dims_of_a_composite_config_come_from_its_text_config():
    """A vision-language config keeps the decoder's sizes in its text config: the scheduler's
    store, the worker's and the engine-args hook all read them through `get_text_config()`."""
    from types import SimpleNamespace

    from tiny_model import TINY_LLAMA

    text = SimpleNamespace(**TINY_LLAMA)
    composite = SimpleNamespace(get_text_config=lambda: text, vision_config=object())
    assert ModelDims.from_hf_config(composite) == ModelDims.from_hf_config(text)
    assert ModelDims.from_hf_config(composite, tp_size=2).tp_size == 2
