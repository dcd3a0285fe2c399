"""The harness's compressed fleet (`bench.compressed_fleet`): a run's hard-linked adapters served
from one collection built by compressing their few distinct weight files, with real files."""

from __future__ import annotations

import os

import pytest
import torch

from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.bench.compressed_fleet import COLLECTION, prepare_compressed
from slora_plugin.bench.run import adapter_plan, fleet_of, prepare_adapters
from slora_plugin.bench.workload import WorkloadSpec, generate
from slora_plugin.compress.collection import CompressedCollection
from slora_plugin.model_config import ModelMemory, load_model_config


@pytest.fixture(autouse=True)
def _one_cpu_thread(one_cpu_thread):
    yield


def test_served_collection_names_every_adapter_with_its_groups_compression(tmp_path, tiny_model_dir, monkeypatch):
    model_cfg = load_model_config(tiny_model_dir)
    dims = ModelMemory.from_config(model_cfg).dims
    plan = adapter_plan([generate(WorkloadSpec(n_adapters=6, num_requests=4, ranks=(2, 4)))])
    root = str(tmp_path)
    prepare_adapters(root, plan, model_cfg, ["q_proj", "v_proj"], distinct=2)
    groups = {a.name: a.group for a in fleet_of(plan, 2)}
    assert len(set(groups.values())) == 4 and len(groups) == len(plan)

    fleet = prepare_compressed(root, groups, os.path.join(root, "variants"), dims, rank=6)
    packed = CompressedCollection(os.path.join(root, "compressed-k6-c1", "groups"))
    served = CompressedCollection(os.path.join(fleet.adapter_dir, COLLECTION))
    assert packed.names == sorted(set(groups.values())) and served.names == sorted(groups)
    for name, group in groups.items():
        for layer in range(dims.num_hidden_layers):
            assert torch.equal(served.delta(name, layer, "q_proj"), packed.delta(group, layer, "q_proj"))
        assert fleet.module_errors[name] and all(0 <= e < 1.5 for e in fleet.module_errors[name])
    # the plugin's adapter index sees each one as <collection>/<name>, at the path the runner asks for
    index = AdapterIndex(fleet.adapter_dir)
    name = sorted(groups)[3]
    assert fleet.request_name(name) in index.scan()
    assert fleet.request_path(name) == os.path.join(fleet.adapter_dir, COLLECTION, name)
    fields = fleet.error_fields(sorted(groups)[:2])
    errs = [e for n in sorted(groups)[:2] for e in fleet.module_errors[n]]
    assert fields == {"rank_k": 6, "clusters": 1, "rel_error_mean": pytest.approx(sum(errs) / len(errs)),
                      "rel_error_max": max(errs)}

    # a second run with the same groups reuses the compression; the served names are rebuilt
    def no_compression(*args, **kwargs):
        raise AssertionError("compressed again")

    monkeypatch.setattr("slora_plugin.compress.api.compress_collection", no_compression)
    fewer = dict(sorted(groups.items())[1:])
    assert set(fewer.values()) == set(groups.values())
    again = prepare_compressed(root, fewer, os.path.join(root, "variants"), dims, rank=6)
    assert CompressedCollection(os.path.join(again.adapter_dir, COLLECTION)).names == sorted(fewer)


def test_other_rank_compresses_anew(tmp_path, tiny_model_dir):
    model_cfg = load_model_config(tiny_model_dir)
    dims = ModelMemory.from_config(model_cfg).dims
    plan = adapter_plan([generate(WorkloadSpec(n_adapters=2, num_requests=2, ranks=(2,)))])
    root = str(tmp_path)
    prepare_adapters(root, plan, model_cfg, ["q_proj"], distinct=1)
    groups = {a.name: a.group for a in fleet_of(plan, 1)}
    a = prepare_compressed(root, groups, os.path.join(root, "variants"), dims, rank=2)
    b = prepare_compressed(root, groups, os.path.join(root, "variants"), dims, rank=3)
    assert (a.rank, b.rank) == (2, 3) and a.adapter_dir != b.adapter_dir
    assert CompressedCollection(os.path.join(b.adapter_dir, COLLECTION)).manifest.rank == 3
