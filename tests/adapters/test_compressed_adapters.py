"""The host side of serving compressed collections: an adapter directory that mixes plain adapters
and a collection written by the real compressor from real PEFT adapters (written here)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

from slora_plugin.adapters.cli import check_directory
from slora_plugin.adapters.compressed import CollectionBases, CompressedSpec
from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import tensor_name, write_random_adapter
from slora_plugin.adapters.resolver import lora_request
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.adapters.store import AdapterStore
from slora_plugin.compress.api import compress_collection
from slora_plugin.compress.collection import MANIFEST, CompressedCollection, tensor_key
from slora_plugin.core_layout import plan_cores

PAGE = 256
RANKS = {"a": 2, "org/b": 3}
MODULES = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def mixed(tmp_path, tiny_dims):
    """root/: plain adapters `plain` and `org/plain2`, and the collection `coll` of `a`, `org/b`
    (compressed with K = 5 >= the sum of their ranks: exact up to the fp32 storage)."""
    src, root = tmp_path / "src", tmp_path / "root"
    for i, (name, rank) in enumerate(RANKS.items()):
        write_random_adapter(str(src / name), tiny_dims, rank, MODULES, alpha=2 * rank, seed=10 + i,
                             dtype=torch.float32)
    write_random_adapter(str(root / "plain"), tiny_dims, 4, ["q_proj"], seed=1)
    write_random_adapter(str(root / "org" / "plain2"), tiny_dims, 2, ["v_proj"], seed=2)
    compress_collection(str(src), str(root / "coll"), 5, dims=tiny_dims, dtype=torch.float32)
    return src, root


def store_of(root, dims, **kw) -> AdapterStore:
    return AdapterStore(dims, PAGE, torch.float32, adapter_dir=str(root), max_rank=16,
                        host_cache_bytes=1 << 22, loader_threads=1, **kw)


def test_index_lists_collections_beside_plain_adapters(mixed):
    _, root = mixed
    index = AdapterIndex(str(root))
    assert index.scan() == ["coll/a", "coll/org/b", "org/plain2", "plain"]
    assert index.scan(collections=False) == ["org/plain2", "plain"]
    assert index.locate("coll/org/b") == os.path.join(os.path.realpath(root), "coll", "org", "b")
    with pytest.raises(AdapterNotFoundError):
        index.locate("coll")  # the collection itself is no adapter


def test_spec_gives_the_page_need_and_plain_specs_are_unchanged(mixed, tiny_dims):
    _, root = mixed
    with store_of(root, tiny_dims) as store:
        spec = store.spec("coll/org/b")
        assert isinstance(spec, CompressedSpec)
        assert spec.modules == ("q_proj", "v_proj") and spec.ranks == {}
        assert spec.num_pages == plan_cores(MODULES, 5, False, PAGE).num_pages
        plain = store.spec("plain")
        assert isinstance(plain, AdapterSpec) and plain.ranks["q_proj"] == 4
        # lora_path round trip: the path a LoRARequest carries is the same adapter
        req = lora_request("coll/a", store)
        assert req.lora_name == "coll/a"
        assert store.spec(req.lora_path) is store.spec("coll/a")


def test_get_leases_cores_in_page_form_through_the_host_cache(mixed, tiny_dims):
    """A compressed adapter's lease holds its cores as they go into its pages; with its
    cluster's bases (read once, `CollectionBases`) they give the adapter's own update."""
    src, root = mixed
    coll = CompressedCollection(str(root / "coll"))
    bases = CollectionBases(tiny_dims, torch.float32)
    with store_of(root, tiny_dims) as store:
        for name in RANKS:
            with store.get(f"coll/{name}") as lease:
                spec, cores = lease.spec, lease.raw
                layout = spec.layout
                assert isinstance(spec, CompressedSpec)
                assert cores.shape == (tiny_dims.num_hidden_layers, layout.num_pages, PAGE)
                assert lease.nbytes == cores.numel() * cores.element_size()
                assert cores.data_ptr() == store.cache.buffer[lease._entry.offset:].data_ptr()
                stored = coll.cores(name)
                for layer in range(tiny_dims.num_hidden_layers):
                    flat = cores[layer].reshape(-1)
                    for m in MODULES:
                        rows = torch.stack([flat[o:o + 5] for o in layout.rows[m]])
                        assert torch.equal(rows, stored[tensor_key(layer, m, "core")])
                        # K >= sum of ranks: U Σ Vᵀ is the adapter's own scale * B A
                        u = bases.get(spec)[tensor_key(layer, m, "U")].double()
                        v = bases.get(spec)[tensor_key(layer, m, "V")].double()
                        with safe_open(os.path.join(src, name, "adapter_model.safetensors"), "pt") as f:
                            a = f.get_tensor(tensor_name(layer, m, "A")).double()
                            b = f.get_tensor(tensor_name(layer, m, "B")).double()
                        ref = 2.0 * b @ a  # alpha = 2 r
                        assert torch.allclose(u @ rows.double() @ v.T, ref, atol=1e-5, rtol=1e-4)
        assert bases.reads == 1  # one cluster, read once for both adapters
        assert store.stats()["loads"] == 2
        with store.get("coll/a"):  # cached: no second read
            assert store.stats()["loads"] == 2 and store.stats()["hits"] == 1
        with store.get("plain") as lease:  # plain adapters load as before
            assert lease.spec.name == "plain"


def test_prefetch_and_readiness_cover_compressed_adapters(mixed, tiny_dims):
    _, root = mixed
    with store_of(root, tiny_dims) as store:
        store.spec("coll/org/b")
        assert not store.ready("coll/org/b")
        store.prefetch(["coll/org/b"])
        with store.get("coll/org/b") as lease:  # joins the prefetch's load, or finds it done
            assert lease.spec.name == "coll/org/b"
        assert store.ready("coll/org/b") and store.stats()["loads"] == 1
        store.start("coll/a")
        with store.get("coll/a"):
            assert store.stats()["loads"] == 2


def test_a_manifest_is_parsed_once_until_it_changes(mixed, tiny_dims, monkeypatch):
    from slora_plugin.adapters import compressed

    _, root = mixed
    parsed = []
    real = compressed.Manifest.from_json
    monkeypatch.setattr(compressed.Manifest, "from_json",
                        classmethod(lambda cls, data, where: parsed.append(where) or real(data, where)))
    with store_of(root, tiny_dims) as store:
        store.spec("coll/a")
        store.spec("coll/org/b")
    assert parsed == [str(root / "coll" / MANIFEST)]  # once for both adapters
    manifest = root / "coll" / MANIFEST
    os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
    parsed.clear()
    with store_of(root, tiny_dims) as store:
        store.spec("coll/a")
        store.spec("coll/org/b")
    assert parsed == [str(manifest)]


def test_non_finite_cores_are_refused_naming_the_core(mixed, tiny_dims):
    from safetensors.torch import load_file, save_file

    _, root = mixed
    path = root / "coll" / "cores" / "a.safetensors"
    tensors = load_file(str(path))
    key = tensor_key(1, "v_proj", "core")
    tensors[key] = tensors[key].clone()
    tensors[key][2, 3] = 1e6  # finite in fp32, Inf in the fp16 the store serves
    save_file(tensors, str(path))
    store = AdapterStore(tiny_dims, PAGE, torch.float16, adapter_dir=str(root), max_rank=16,
                         host_cache_bytes=1 << 22, loader_threads=1)
    with store, pytest.raises(AdapterError, match="non-finite") as e:
        store.get("coll/a")
    assert e.value.adapter == "coll/a" and e.value.file == str(path) and key in e.value.reason


def test_errors_name_the_adapter_the_file_and_the_reason(mixed, tiny_dims):
    _, root = mixed
    with store_of(root, tiny_dims) as store:
        with pytest.raises(AdapterNotFoundError, match="no adapter 'zzz'") as e:
            store.spec("coll/zzz")
        assert e.value.adapter == "coll/zzz" and e.value.file.endswith(MANIFEST)
        cores = root / "coll" / "cores" / "a.safetensors"
        cores.write_bytes(b"\x00" * 16)
        with pytest.raises(AdapterError) as e:
            store.get("coll/a")
        assert e.value.adapter == "coll/a" and e.value.file == str(cores)
        assert "cannot be read" in e.value.reason
    other = dataclasses.replace(tiny_dims, num_hidden_layers=tiny_dims.num_hidden_layers + 1)
    with store_of(root, other) as store, pytest.raises(AdapterError, match="layers") as e:
        store.spec("coll/org/b")
    assert e.value.file.endswith(MANIFEST)
    (root / "coll" / MANIFEST).write_text("{not json")
    with store_of(root, tiny_dims) as store, pytest.raises(AdapterError, match="cannot be read") as e:
        store.spec("coll/org/b")
    assert e.value.file.endswith(MANIFEST)
    index = AdapterIndex(str(root))
    assert index.scan() == ["org/plain2", "plain"]
    assert [s.adapter for s in index.skipped] == ["coll"]


def test_target_survey_adds_the_collections_modules(mixed, tiny_dims, tmp_path):
    """Engine start (no slora.target_modules): the collection's modules join the plain
    adapters' in the LoRA layers, so its adapters pass the store's wrapped-module check."""
    from slora_plugin.adapters.targets import survey_directory

    src, _ = mixed
    root = tmp_path / "o_and_coll"
    write_random_adapter(str(root / "o"), tiny_dims, 4, ["o_proj"], seed=1)
    assert survey_directory(str(root), tiny_dims, 16).modules == ("o_proj",)
    compress_collection(str(src), str(root / "coll"), 5, dims=tiny_dims, dtype=torch.float32)
    survey = survey_directory(str(root), tiny_dims, 16)
    assert survey.modules == ("qkv_proj", "o_proj")
    assert (survey.total, survey.skipped) == (3, ())
    with store_of(root, tiny_dims, lora_target_modules=list(survey.modules)) as store:
        assert isinstance(store.spec("coll/a"), CompressedSpec)


def test_adapters_check_covers_collections(mixed, tiny_dims):
    _, root = mixed
    total, problems = check_directory(str(root), tiny_dims)
    assert (total, problems) == (4, [])
    (root / "coll" / "cores" / "org" / "b.safetensors").unlink()
    total, problems = check_directory(str(root), tiny_dims)
    assert total == 4 and [(p.adapter, os.path.basename(p.file)) for p in problems] == \
        [("coll/org/b", "b.safetensors")]
    assert check_directory(str(root), None) == (4, [])


def test_a_manifest_cannot_lead_outside_the_collection(mixed, tiny_dims):
    import json

    _, root = mixed
    path = root / "coll" / MANIFEST
    data = json.loads(path.read_text())
    data["adapters"]["../../evil"] = dict(data["adapters"]["a"])
    data["adapters"]["org/b"]["cores"] = "../../plain/adapter_model.safetensors"
    path.write_text(json.dumps(data))
    index = AdapterIndex(str(root))
    assert "coll/../../evil" not in index.scan()
    assert [s.adapter for s in index.skipped] == ["coll/../../evil"]
    with store_of(root, tiny_dims) as store:
        with pytest.raises(AdapterError, match="leads outside the collection") as e:
            store.spec("coll/org/b")
        assert e.value.file.endswith(MANIFEST)
        assert isinstance(store.spec("coll/a"), CompressedSpec)
