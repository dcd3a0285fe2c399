"""Random valid adapters round-trip through validation, the raw host form and the page writer,
exactly."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora_plugin.adapters import AdapterStore
from slora_plugin.adapters.peft_format import adapter_config, tensor_name, write_adapter
from raw_pages import render_pages
from slora_plugin.layout import MODULES, unpack_layer

DT = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def adapters(draw, num_layers: int):
    """(config, per-(layer, module) rank and alpha) of a random valid adapter."""
    targets = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=7, unique=True))
    r = draw(st.integers(1, 8))
    alpha = draw(st.sampled_from([1, 3, 8, 16.5]))
    rslora = draw(st.booleans())
    rank_pattern, alpha_pattern = {}, {}
    for m in draw(st.lists(st.sampled_from(targets), unique=True, max_size=3)):
        parent = "self_attn" if m[0] in "qkvo" else "mlp"
        key = draw(st.sampled_from([m, f"layers.{draw(st.integers(0, num_layers - 1))}.{parent}.{m}"]))
        rank_pattern[key] = draw(st.integers(1, 12))
    for m in draw(st.lists(st.sampled_from(targets), unique=True, max_size=2)):
        alpha_pattern[m] = draw(st.sampled_from([2, 5, 32]))
    use_regex = draw(st.booleans())
    target_field = (r"model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
                    if use_regex else targets)
    cfg = adapter_config(r, alpha, target_field, use_rslora=rslora, rank_pattern=rank_pattern,
                         alpha_pattern=alpha_pattern)
    expect = {}
    for layer in range(num_layers):
        for m in targets:
            key = f"model.layers.{layer}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}"
            rk = next((p for p in rank_pattern if _peft_match(p, key)), None)
            ak = next((p for p in alpha_pattern if _peft_match(p, key)), None)
            rr = rank_pattern[rk] if rk else r
            aa = alpha_pattern[ak] if ak else alpha
            expect[(layer, m)] = (rr, aa / math.sqrt(rr) if rslora else aa / rr)
    return cfg, expect


def _peft_match(pattern: str, key: str) -> bool:
    from peft.utils.other import get_pattern_key

    return get_pattern_key([pattern], key) == pattern


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), src=st.sampled_from(DT), serve=st.sampled_from(DT), page=st.sampled_from([96, 256, 1000]))
def test_random_adapters_round_trip(tmp_path_factory, tiny_dims, data, src, serve, page):
    cfg, expect = data.draw(adapters(tiny_dims.num_hidden_layers))
    root = tmp_path_factory.mktemp("ad")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tensors = {}
    for (layer, m), (rr, _) in expect.items():
        fin, fout = tiny_dims.module_io(m)
        tensors[tensor_name(layer, m, "A")] = torch.randn(rr, fin, generator=g).to(src)
        tensors[tensor_name(layer, m, "B")] = torch.randn(fout, rr, generator=g).to(src)
    write_adapter(str(root / "x"), cfg, tensors)
    with AdapterStore(tiny_dims, page, serve, adapter_dir=str(root), max_rank=16,
                      host_cache_bytes=1 << 20, loader_threads=2) as store:
        spec = store.spec("x")
        for m in spec.ranks:
            assert spec.ranks[m] == max(rr for (_, mm), (rr, _) in expect.items() if mm == m)
        with store.get("x") as lease:
            assert lease.raw.layout.dtype == serve
            pages = render_pages(lease.raw, spec.layout)  # the GPU's writer (interpreted on CPU)
            assert torch.equal(pages, render_pages(lease.raw, spec.layout, kernel=False))
            assert not pages.isnan().any()  # every element of every page written
            for layer in range(tiny_dims.num_hidden_layers):
                got = unpack_layer(spec.layout, pages[layer])
                for m, (a, b) in got.items():
                    rr, scale = expect.get((layer, m), (0, 0.0))
                    R = spec.ranks[m]
                    want_a = torch.zeros(R, a.shape[1], dtype=serve)
                    want_b = torch.zeros(b.shape[0], R, dtype=serve)
                    if rr:
                        want_a[:rr] = tensors[tensor_name(layer, m, "A")].to(serve)
                        # scale folded in fp32, then one rounding to the serving dtype
                        want_b[:, :rr] = (tensors[tensor_name(layer, m, "B")].float() * scale).to(serve)
                    assert torch.equal(a, want_a), (layer, m)
                    assert torch.equal(b, want_b), (layer, m)
