"""benchmarks/bench_kernels.py's layers (CPU: the script's timing needs a GPU): every --layer is a
fused call the plugin makes, its geometry is the model's, and the default is the Llama-2-7B qkv_proj
the committed kernel results were measured on."""

from __future__ import annotations

import os
import runpy
import sys

import pytest

from slora_plugin.layout import MODULE_INDEX

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")


@pytest.fixture(scope="module")
def bench() -> dict:
    sys.path.insert(0, BENCH)  # as `python benchmarks/bench_kernels.py` has it (fixture_loader)
    try:
        return runpy.run_path(os.path.join(BENCH, "bench_kernels.py"), run_name="bench_kernels")
    finally:
        sys.path.remove(BENCH)


def test_every_layer_is_one_fused_call_of_its_model(bench) -> None:
    for name, layer in bench["LAYERS"].items():
        model, call = name.split(":")
        assert layer.name == name and 1 <= len(layer.modules) <= 3
        assert {layer.dims.module_io(m)[0] for m in layer.modules} == {layer.k_in}  # one input
        assert layer.widths == tuple(layer.dims.module_io(m)[1] for m in layer.modules)
        assert layer.module_ids == tuple(MODULE_INDEX[m] for m in layer.modules)
        assert max(layer.k_in, *layer.widths) <= layer.page_elems  # a row never straddles a page
    gqa = bench["LAYERS"]["llama-3-8b:qkv_proj"]
    assert gqa.widths == (4096, 1024, 1024) and gqa.page_elems == 2 * 16 * 8 * 128
    assert bench["LAYERS"]["llama-3-8b:down_proj"].k_in == 14336


def test_default_layer_and_bytes_are_those_of_the_recorded_runs(bench) -> None:
    layer = bench["LAYERS"][bench["DEFAULT_LAYER"]]
    assert (layer.k_in, layer.widths, layer.page_elems) == (4096, (4096,) * 3, 2 * 16 * 32 * 128)
    ranks = bench["slot_ranks"](layer, (8, 16, 32, 64, 128))[:3]   # slots of ranks 8, 16, 32
    rank_sum = 3 * (8 + 16 + 32)                                     # q, k, v of each
    assert layer.weight_bytes(ranks) == (2 * rank_sum * 4096, 2 * rank_sum * 4096)
    gate_up = bench["LAYERS"]["llama-3-8b:gate_up_proj"]
    assert gate_up.weight_bytes([{"gate_proj": 8, "up_proj": 8}]) == (2 * 16 * 4096, 2 * 16 * 14336)
