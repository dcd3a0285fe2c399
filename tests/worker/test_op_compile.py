"""`slora::lora_linear` under torch.compile: every decoder layer traces to the same graph (the
layer name is a graph input, so vLLM compiles one piece and reuses it), and Inductor keeps the
in-place update with the right layer name at each call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")

from slora_plugin.worker import ops  # noqa: E402
from slora_plugin.worker.lora_layers import PagedLoRALayer  # noqa: E402

D = 8


class _Linear(PagedLoRALayer, nn.Module):
    """The plugin's LoRA forward on a plain linear layer (no vLLM base layer needed)."""

    n_slices = 1
    output_slices = (D,)

    def __init__(self, name: str, seed: int) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)),
                                   requires_grad=False)
        self.bind_paged(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight)
        return torch.relu(self._apply_lora_to_output(x, y)) + 1


def _layers(n: int) -> list[_Linear]:
    return [_Linear(f"model.layers.{i}.self_attn.o_proj", i) for i in range(n)]


class _AddLayerIndex:
    """Stands in for the runtime: adds (layer index + 1) to `y`, so a wrong key shows."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def apply(self, y, x, layer_key, module_ids, slice_widths) -> None:
        self.keys.append(layer_key)
        y.add_(int(layer_key.split(".")[2]) + 1)


def _dynamo_code(module: nn.Module, x: torch.Tensor) -> str:
    codes: list[str] = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True, dynamic=True)(x)
    assert len(codes) == 1
    return codes[0]


def test_every_layer_traces_to_the_same_graph():
    x = torch.randn(5, D)
    codes = [_dynamo_code(m, x) for m in _layers(3)]
    assert "layers" not in codes[0], codes[0]  # the name is not a constant of the graph
    assert codes[0] == codes[1] == codes[2]


def test_inductor_keeps_the_in_place_update_per_layer(monkeypatch, tmp_path):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    rt = _AddLayerIndex()
    ops.install(rt)  # type: ignore[arg-type]
    try:
        x = torch.randn(6, D)
        layers = _layers(2)
        with torch.no_grad():
            expect = [m(x) for m in layers]
            torch._dynamo.reset()
            counters.clear()
            with torch._inductor.config.patch(enable_auto_functionalized_v2=False,
                                              fx_graph_cache=True):
                got = [torch.compile(m, backend="inductor", dynamic=True)(x) for m in layers]
    finally:
        ops.install(None)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e)
    assert rt.keys[-2:] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    # the second layer is the first one's graph: Inductor's cache serves it
    assert counters["inductor"]["fxgraph_cache_hit"] == 1, dict(counters["inductor"])
