"""Compress a directory of PEFT adapters into a collection directory and read it back."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from slora_plugin import cli
from slora_plugin.adapters.peft_format import adapter_config, tensor_name, write_adapter, write_random_adapter
from slora_plugin.compress.api import compress_collection
from slora_plugin.compress.collection import MANIFEST, CompressedCollection, tensor_key
from slora_plugin.compress.source import CompressError, infer_dims

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "fixtures", "correctness")
F64 = torch.float64


def file_delta(path: str, layer: int, module: str, scale: float) -> torch.Tensor:
    """scale * B @ A of one module, read straight from an adapter's safetensors file."""
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor(tensor_name(layer, module, "A")).double()
        b = f.get_tensor(tensor_name(layer, module, "B")).double()
    return scale * b @ a


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref))


def test_round_trip_mixed_ranks_modules_and_scaling(tmp_path, tiny_dims):
    """K >= the sum of ranks of every module: every adapter comes back exactly, its PEFT scale
    (alpha / r, alpha_pattern, rsLoRA alpha / sqrt(r), rank_pattern) folded in."""
    src = tmp_path / "src"
    write_random_adapter(str(src / "plain"), tiny_dims, 3, ["q_proj", "down_proj"], alpha=6, seed=1,
                         dtype=torch.float32)
    write_random_adapter(str(src / "org" / "rs"), tiny_dims, 4, ["q_proj", "k_proj"], alpha=8, seed=2,
                         dtype=torch.float32, use_rslora=True)
    # rank_pattern gives layer 1's q_proj rank 2; alpha_pattern gives v_proj alpha 3
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(2):
        for m, r in (("q_proj", 2 if layer == 1 else 5), ("v_proj", 5)):
            fin, fout = tiny_dims.module_io(m)
            tensors[tensor_name(layer, m, "A")] = torch.randn(r, fin, generator=g) * 0.1
            tensors[tensor_name(layer, m, "B")] = torch.randn(fout, r, generator=g) * 0.1
    cfg = adapter_config(5, 10, ["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                         alpha_pattern={"v_proj": 3})
    write_adapter(str(src / "patterns"), cfg, tensors)

    out = tmp_path / "out"
    report = compress_collection(str(src), str(out), 12, dims=tiny_dims, dtype=F64)
    coll = CompressedCollection(str(out))
    assert coll.names == ["org/rs", "patterns", "plain"]
    assert os.path.isfile(out / "cores" / "org" / "rs.safetensors")
    expected = {
        ("plain", "q_proj", 0): 6 / 3, ("plain", "down_proj", 1): 6 / 3,
        ("org/rs", "q_proj", 1): 8 / math.sqrt(4), ("org/rs", "k_proj", 0): 8 / math.sqrt(4),
        ("patterns", "q_proj", 0): 10 / 5, ("patterns", "q_proj", 1): 10 / 2, ("patterns", "v_proj", 1): 3 / 5,
    }
    for (name, module, layer), scale in expected.items():
        ref = file_delta(str(src / name), layer, module, scale)
        assert rel(coll.delta(name, layer, module), ref) < 1e-6  # delta() is fp32
    assert float(coll.delta("plain", 0, "k_proj").abs().max()) == 0.0  # not adapted: zero
    m = coll.manifest
    assert (m.rank, m.diagonal, m.dtype, m.num_layers) == (12, False, "float64", 2)
    assert set(m.modules) == {"q_proj", "k_proj", "v_proj", "down_proj"}
    assert m.adapters["plain"]["layers"] == {"q_proj": [0, 1], "down_proj": [0, 1]}
    assert m.clusters[0]["layers"]["q_proj"] == [0, 1]
    assert coll.cores("patterns")[tensor_key(1, "q_proj", "core")].shape == (12, 12)
    assert report["rel_error_max"] < 1e-12
    # bytes: every A and B at its real rank (patterns' layer-1 q_proj has rank 2) in fp64
    q, v = sum(tiny_dims.module_io("q_proj")), sum(tiny_dims.module_io("v_proj"))
    assert report["per_adapter"]["patterns"]["uncompressed_bytes"] == 8 * (5 * q + 2 * q + 2 * 5 * v)
    assert report["per_adapter"]["patterns"]["core_bytes"] == 8 * 4 * 144
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rel_error_mean"] == report["rel_error_mean"]
    table = (out / "report.md").read_text()
    assert "| org/rs | 0 |" in table and "ratio" in table


@pytest.mark.slow
def test_real_peft_fixture_adapters_against_peft_deltas(tmp_path):
    """The correctness fixture's adapters, written by peft (rsLoRA, rank/alpha patterns, a regex
    target): compressed with K >= every module's sum of ranks, each comes back as PEFT's own
    delta_weight; at a small K the report's errors are the dense ones."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from slora_plugin.adapters.cli import model_dims

    src = os.path.join(FIXTURE, "adapters")
    dims = model_dims(os.path.join(FIXTURE, "model"))
    out = tmp_path / "exact"
    compress_collection(src, str(out), 64, dims=dims, dtype=F64, iters=0)
    small = tmp_path / "small"
    report = compress_collection(src, str(small), 8, dims=dims, dtype=F64, iters=1)
    exact, approx = CompressedCollection(str(out)), CompressedCollection(str(small))
    base = LlamaForCausalLM.from_pretrained(os.path.join(FIXTURE, "model"), torch_dtype=torch.float32)
    checked = 0
    for name in exact.names:
        model = PeftModel.from_pretrained(base, os.path.join(src, name))
        for layer, block in enumerate(model.base_model.model.model.layers):
            for parent, m in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "o_proj"),
                              ("mlp", "up_proj"), ("mlp", "down_proj")):
                lora = getattr(getattr(block, parent), m)
                if not hasattr(lora, "lora_A") or "default" not in lora.lora_A:
                    assert float(exact.delta(name, layer, m).abs().max()) == 0.0
                    continue
                ref = (lora.lora_B["default"].weight.double() @ lora.lora_A["default"].weight.double()
                       * lora.scaling["default"])
                assert rel(exact.delta(name, layer, m), ref) < 1e-6, (name, layer, m)
                err = report["per_adapter"][name]["modules"][m]["layers"][str(layer)]
                assert abs(rel(approx.delta(name, layer, m), ref) - err) < 1e-5, (name, layer, m)
                checked += 1
        base = model.unload()
    assert checked >= 30


def test_clusters_recover_adapters_of_two_subspaces(tmp_path, tiny_dims):
    """Two families, each inside its own rank-3 subspace: 2 clusters at K=3 are exact, one is not."""
    src = tmp_path / "src"
    g = torch.Generator().manual_seed(0)
    k, module = 3, "o_proj"
    fin, fout = tiny_dims.module_io(module)
    families = [(torch.linalg.qr(torch.randn(fout, k, generator=g)).Q,
                 torch.linalg.qr(torch.randn(fin, k, generator=g)).Q) for _ in range(2)]
    for i in range(8):
        u0, v0 = families[i % 2]
        tensors = {}
        for layer in range(2):
            tensors[tensor_name(layer, module, "A")] = (torch.randn(2, k, generator=g) @ v0.T).contiguous()
            tensors[tensor_name(layer, module, "B")] = u0 @ torch.randn(k, 2, generator=g)
        write_adapter(str(src / f"a{i}"), adapter_config(2, 2, [module]), tensors)
    two = compress_collection(str(src), str(tmp_path / "two"), k, clusters=2, dims=tiny_dims, dtype=F64)
    labels = [two["per_adapter"][f"a{i}"]["cluster"] for i in range(8)]
    assert labels[0::2] == [labels[0]] * 4 and labels[1::2] == [1 - labels[0]] * 4
    assert two["rel_error_max"] < 1e-6  # the files are fp32: exact up to their rounding
    coll = CompressedCollection(str(tmp_path / "two"))
    assert coll.cluster_of("a1") == labels[1]
    assert len(coll.manifest.clusters) == 2 and os.path.isfile(tmp_path / "two" / "bases" / "cluster-0001.safetensors")
    one = compress_collection(str(src), str(tmp_path / "one"), k, clusters=1, dims=tiny_dims, dtype=F64)
    assert one["rel_error_mean"] > 0.1


def test_diagonal_collection_round_trip(tmp_path, tiny_dims):
    src = tmp_path / "src"
    for i in range(3):
        write_random_adapter(str(src / f"a{i}"), tiny_dims, 2, ["v_proj"], seed=i, dtype=torch.float32)
    compress_collection(str(src), str(tmp_path / "out"), 6, diagonal=True, dims=tiny_dims, dtype=torch.float32)
    coll = CompressedCollection(str(tmp_path / "out"))
    core = coll.cores("a1")[tensor_key(0, "v_proj", "core")]
    assert coll.manifest.diagonal and core.shape == (6,) and core.dtype == torch.float32
    bases = coll.bases(0)
    u, v = bases[tensor_key(0, "v_proj", "U")].double(), bases[tensor_key(0, "v_proj", "V")].double()
    assert torch.allclose(coll.delta("a1", 0, "v_proj").double(), u @ torch.diag(core.double()) @ v.T, atol=1e-6)


def test_inferred_dims_match_the_model(tmp_path, tiny_dims):
    src = tmp_path / "src"
    write_random_adapter(str(src / "a"), tiny_dims, 2, ["q_proj", "k_proj", "down_proj"], seed=0)
    write_random_adapter(str(src / "b"), tiny_dims, 3, ["o_proj", "up_proj"], seed=1)
    dims = infer_dims(str(src))
    assert dims.num_hidden_layers == tiny_dims.num_hidden_layers
    for m in ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"):
        assert dims.module_io(m) == tiny_dims.module_io(m)
    report = compress_collection(str(src), str(tmp_path / "out"), 4)  # no dims: inferred
    assert report["adapters"] == 2


def test_bad_adapters_are_listed_and_nothing_is_written(tmp_path, tiny_dims):
    src = tmp_path / "src"
    write_random_adapter(str(src / "good"), tiny_dims, 2, ["q_proj"])
    write_random_adapter(str(src / "dora"), tiny_dims, 2, ["q_proj"], use_dora=True)
    write_random_adapter(str(src / "big"), tiny_dims, 8, ["q_proj"])
    with pytest.raises(CompressError) as e:
        compress_collection(str(src), str(tmp_path / "out"), 4, dims=tiny_dims, max_rank=4)
    assert {p.adapter for p in e.value.problems} == {"dora", "big"}
    assert "DoRA" in str(e.value) and "above the configured maximum rank" in str(e.value)
    assert not os.path.exists(tmp_path / "out" / MANIFEST)


def test_non_finite_weights_and_bad_requests_are_refused(tmp_path, tiny_dims):
    src = tmp_path / "src"
    write_random_adapter(str(src / "good"), tiny_dims, 2, ["k_proj"])
    with pytest.raises(CompressError, match="exceeds the smaller dimension"):
        compress_collection(str(src), str(tmp_path / "o1"), 40, dims=tiny_dims)  # k_proj out is 32
    with pytest.raises(CompressError, match="clusters"):
        compress_collection(str(src), str(tmp_path / "o2"), 2, clusters=2, dims=tiny_dims)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(CompressError, match="not empty"):
        compress_collection(str(src), str(tmp_path / "busy"), 2, dims=tiny_dims)
    t = {tensor_name(l, "k_proj", w): torch.ones(*( (2, 64) if w == "A" else (32, 2))) for l in range(2) for w in "AB"}
    t[tensor_name(1, "k_proj", "B")][3, 1] = float("nan")
    write_adapter(str(src / "nan"), adapter_config(2, 2, ["k_proj"]), t)
    with pytest.raises(CompressError, match="'nan'.*layer 1 k_proj lora_B has NaN"):
        compress_collection(str(src), str(tmp_path / "o3"), 2, dims=tiny_dims)


def test_cli(tmp_path, tiny_dims, tiny_model_dir, capsys):
    src = tmp_path / "src"
    for i in range(2):
        write_random_adapter(str(src / f"a{i}"), tiny_dims, 2, ["q_proj", "v_proj"], seed=i)
    out = tmp_path / "out"
    rc = cli.main(["adapters", "compress", str(src), str(out), "--rank", "4", "--model", tiny_model_dir,
                   "--dtype", "float32", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 adapters -> rank 4" in printed and "report.md" in printed
    assert CompressedCollection(str(out)).manifest.dtype == "float32"
    assert cli.main(["adapters", "compress", str(src), str(out), "--rank", "4"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_compression_and_its_kernel_import_nothing_of_vllm():
    """Compression runs where vLLM is absent (an offline job on any machine with torch)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['vllm'] = None; "
            "import slora_plugin.compress.api, slora_plugin.compress.cli, slora_plugin.core_layout, "
            "slora_plugin.kernels.compressed_lora, slora_plugin.kernels.compressed_reference")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
