"""vLLM's LoRA layers, wrapped by the plugin, on CPU: base + merged adapter for a mixed batch.

A toy `SupportsLoRA` model with Llama's four LoRA modules per layer goes through the plugin's
model manager exactly as in the engine (vLLM's `from_layer`, slots, punica CPU metadata); the
adapters sit in the layers' KV pools at scattered blocks, and every token's output must equal
the base layer plus its own adapter's merged delta (different ranks, missing modules, no adapter).
"""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from slora_plugin.layout import MODULES, plan_layout, pack_layer

vllm = pytest.importorskip("vllm")

from vllm.config import LoRAConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.models.interfaces import SupportsLoRA  # noqa: E402

from slora_plugin.patches.layer_name import encode_layer_name as enc  # noqa: E402
from slora_plugin.worker import ops  # noqa: E402
from slora_plugin.worker.lora_layers import PagedLoRALayer  # noqa: E402
from slora_plugin.worker.lora_manager import AdapterNotResidentError, SLoRAModelManager  # noqa: E402

PAGE = 512
NUM_BLOCKS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_cpu():
    import vllm.utils.torch_utils as tu

    tu.PIN_MEMORY = False
    from vllm.config import DeviceConfig

    vc = VllmConfig(device_config=DeviceConfig(device="cpu"), additional_config={"slora": {}})
    with set_current_vllm_config(vc):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{_free_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        yield vc


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        h, q, kv = d.hidden_size, d.num_attention_heads, d.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(h, d.head_dim, q, kv, bias=False, params_dtype=torch.float32)
        self.o_proj = RowParallelLinear(q * d.head_dim, h, bias=False, params_dtype=torch.float32)


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            d.hidden_size, [d.intermediate_size] * 2, bias=False, params_dtype=torch.float32)
        self.down_proj = RowParallelLinear(d.intermediate_size, d.hidden_size, bias=False,
                                           params_dtype=torch.float32)


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = _Attn(d), _Mlp(d)


class ToyModel(nn.Module, SupportsLoRA):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}
    embedding_modules: dict = {}

    def __init__(self, d):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(d) for _ in range(d.num_hidden_layers)])
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)


def _manager(vc, dims, monkeypatch, slots=3):
    import vllm.lora.model_manager as mm
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    monkeypatch.setattr(mm, "get_punica_wrapper", lambda *a, **k: PunicaWrapperCPU(*a, **k))
    model = ToyModel(dims)
    base = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if hasattr(m, "weight") and n.count(".") >= 4}
    lc = LoRAConfig(max_lora_rank=16, max_loras=slots, max_cpu_loras=slots)
    lc.lora_dtype = torch.float32
    mgr = SLoRAModelManager(model, 8, 64, 256, lc, torch.device("cpu"), vc)
    return model, mgr, base


def _layer_key_pools(mgr, dims):
    pools = [torch.zeros(NUM_BLOCKS, PAGE) for _ in range(dims.num_hidden_layers)]
    for name in mgr.modules:
        layer = int(name.split("layers.")[1].split(".")[0])
        mgr.runtime.bind_layer(name, lambda kv=pools[layer]: kv)
    return pools


def _install_adapter(mgr, pools, dims, lora_id, ranks, block_ids, g):
    layout = plan_layout(ranks, dims, PAGE)
    block_ids = tuple(block_ids[: layout.num_pages])
    weights = []
    for pool in pools:
        w = {m: (torch.randn(pl.rank, pl.in_features, generator=g) * 0.1,
                 torch.randn(pl.out_features, pl.rank, generator=g) * 0.1)
             for m, pl in layout.modules.items()}
        packed = torch.zeros(layout.num_pages, PAGE)
        pack_layer(layout, w, packed)
        pool[list(block_ids)] = packed
        weights.append(w)
    mgr.mark_resident(lora_id, layout, block_ids)
    mgr.add_adapter(mgr.resident_model(lora_id))
    mgr.activate_adapter(lora_id)
    return weights


def _delta(x, w, layer_module_suffix, dims):
    slices = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
              "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    outs = []
    for m in slices[layer_module_suffix]:
        fin, fout = dims.module_io(m)
        if m in w:
            a, b = w[m]
            outs.append(x @ a.t() @ b.t())
        else:
            outs.append(torch.zeros(x.shape[0], fout))
    return torch.cat(outs, dim=1)



def _map_requests(mgr, req: list[tuple[int, int]]) -> tuple[int, ...]:
    """Map (lora id, tokens) requests onto the manager as one prefill batch; the token map."""
    token_map = tuple(i for i, n in req for _ in range(n))
    mgr.set_adapter_mapping(LoRAMapping(token_map, tuple(i for i, _ in req), is_prefill=True))
    return token_map


def _layer_inputs(dims) -> dict[str, int]:
    """Input width of each LoRA layer kind of the tiny model."""
    return {"qkv_proj": dims.hidden_size, "o_proj": 64, "gate_up_proj": dims.hidden_size,
            "down_proj": dims.intermediate_size}


def _layer_outputs(vllm_cpu, mgr, num_tokens: int, x_in: dict, g: torch.Generator):
    """(name, layer, module suffix, x, y) for every LoRA layer of `mgr` run on random x."""
    with set_current_vllm_config(vllm_cpu):
        for name, module in mgr.modules.items():
            layer = int(name.split("layers.")[1].split(".")[0])
            suffix = name.rsplit(".", 1)[1]
            x = torch.randn(num_tokens, x_in[suffix], generator=g)
            y = module(x)
            yield name, layer, suffix, x, y[0] if isinstance(y, tuple) else y


def test_mixed_batch_equals_base_plus_merged(vllm_cpu, tiny_dims, monkeypatch):
    g = torch.Generator().manual_seed(0)
    model, mgr, base = _manager(vllm_cpu, tiny_dims, monkeypatch)
    assert all(isinstance(m, PagedLoRALayer) for m in mgr.modules.values())
    assert sorted(n.rsplit(".", 1)[1] for n in mgr.modules) == sorted(
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] * tiny_dims.num_hidden_layers)
    for m in mgr.modules.values():  # no stacked buffers were allocated
        assert all(t.device.type == "meta" for t in m.lora_a_stacked + m.lora_b_stacked)
    pools = _layer_key_pools(mgr, tiny_dims)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    w7 = _install_adapter(mgr, pools, tiny_dims, 7, {m: 8 for m in MODULES}, free[:20], g)
    w9 = _install_adapter(mgr, pools, tiny_dims, 9,
                          {"q_proj": 2, "v_proj": 5, "up_proj": 3, "down_proj": 16}, free[20:], g)
    adapters = {7: w7, 9: w9}
    # requests: lora 7 (3 tokens), none (2), lora 9 (4), lora 7 (1)
    req = [(7, 3), (0, 2), (9, 4), (7, 1)]
    token_map = _map_requests(mgr, req)
    x_in = _layer_inputs(tiny_dims)
    for name, layer, suffix, x, y in _layer_outputs(vllm_cpu, mgr, len(token_map), x_in, g):
        expect = x @ base[name].t()
        for t, lid in enumerate(token_map):
            if lid:
                expect[t] += _delta(x[t:t + 1], adapters[lid][layer], suffix, tiny_dims)[0]
        torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4, msg=name)


def test_slots_follow_activation_and_eviction(vllm_cpu, tiny_dims, monkeypatch):
    g = torch.Generator().manual_seed(1)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    _install_adapter(mgr, pools, tiny_dims, 3, {"o_proj": 4}, list(range(1, 10)), g)
    slot = mgr.lora_index_to_id.index(3)
    assert mgr.runtime.tables.ranks[slot, MODULES.index("o_proj")] == 4
    mgr.evict(3)
    assert 3 not in mgr.lora_index_to_id and int(mgr.runtime.tables.ranks.sum()) == 0
    assert not mgr.is_resident(3)
    with pytest.raises(AdapterNotResidentError, match="id 3"):
        mgr.resident_model(3)
    # vLLM's warm-up adapters take slots with rank 0 everywhere
    mgr.add_dummy(1, 8)
    mgr.activate_adapter(1)
    assert 1 in mgr.lora_index_to_id and int(mgr.runtime.tables.ranks.sum()) == 0
    mgr.remove_all_adapters()
    assert mgr.lora_index_to_id == [None, None]


def test_op_without_pool_leaves_output_unchanged(vllm_cpu):
    y = torch.randn(4, 8)
    before = y.clone()
    ops.install(None)
    torch.ops.slora.lora_linear(y, torch.randn(4, 8), enc("model.layers.0.self_attn.o_proj"),
                                [3], [8])
    assert torch.equal(y, before)
    rt = ops.PagedLoRARuntime(num_slots=2, max_rank=4, max_tokens=16, device="cpu")
    ops.install(rt)
    try:
        rt.bind_layer("k", lambda: torch.empty(0))  # KV cache not allocated yet
        torch.ops.slora.lora_linear(y, torch.randn(4, 8), enc("k"), [3], [8])
        torch.ops.slora.lora_linear(y, torch.randn(4, 8), enc("unbound"), [3], [8])
        assert torch.equal(y, before)
    finally:
        ops.install(None)


class _Lease:
    def __init__(self, spec, raw, log):
        self.spec, self.raw, self.log = spec, raw, log
        self.nbytes = raw.layout.nbytes
        self.waited_s = 0.25  # as if the step had waited for the disk

    def __enter__(self):
        self.log.append("get")
        return self

    def __exit__(self, *exc):
        self.log.append("release")


class _Store:
    """The host store's contract: spec/get (lease with the raw pinned adapter)/prefetch."""

    def __init__(self, dims, layouts, g):
        from slora_plugin.raw_format import RawAdapter, raw_layout

        from types import SimpleNamespace

        self.dims, self.layouts, self.g, self.log, self.prefetched = dims, layouts, g, [], []
        self.cache = SimpleNamespace(arena=SimpleNamespace(capacity=1 << 30))
        self.raws = {}
        for p, lay in layouts.items():
            rl = raw_layout(lay, dims.num_hidden_layers, torch.float32)
            raw = RawAdapter(torch.zeros(rl.nbytes, dtype=torch.uint8), rl)
            for rm in rl.modules:
                raw.a(rm.module).copy_(torch.randn(raw.a(rm.module).shape, generator=g))
                raw.b(rm.module).copy_(torch.randn(raw.b(rm.module).shape, generator=g))
                raw.scales()[:, rm.index] = 0.5
                raw.layer_ranks()[:, rm.index] = rm.rank
            self.raws[p] = raw

    def get(self, path):
        from types import SimpleNamespace

        lay = self.layouts[path]
        return _Lease(SimpleNamespace(num_pages=lay.num_pages, layout=lay), self.raws[path], self.log)

    @property
    def step_share_bytes(self):
        return self.cache.arena.capacity // 2

    def prefetch(self, paths):
        self.prefetched.extend(paths)
        self.log.extend(f"prefetch {p}" for p in paths)


def test_worker_applies_evict_load_prefetch(vllm_cpu, tiny_dims, monkeypatch):
    from raw_pages import render_pages
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    g = torch.Generator().manual_seed(2)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    layout = plan_layout({"q_proj": 4, "down_proj": 8}, tiny_dims, PAGE)
    store = _Store(tiny_dims, {"/a/x": layout}, g)
    w = _bare_worker(mgr, pools, store, tiny_dims)

    blocks = tuple(range(30, 30 - layout.num_pages, -1))  # descending: one copy per page
    w.apply_commands(StepCommands(load=(LoadAdapter(5, "x", "/a/x", blocks),),
                                  prefetch=(("y", "/a/y"),)))
    pages = render_pages(store.raws["/a/x"], layout, kernel=False)
    for l, pool in enumerate(pools):
        assert torch.equal(pool[list(blocks)], pages[l])
    # the step's own loads start reading before the first get waits; then the queued hints
    assert mgr.is_resident(5) and store.prefetched == ["/a/x", "/a/y"]
    assert store.log == ["prefetch /a/x", "get", "prefetch /a/y"]
    assert w.host_waits.snapshot() == {"host_load_hits": 0, "host_load_waits": 1,
                                       "host_load_wait_s": 0.25}
    mgr.add_adapter(mgr.resident_model(5))
    mgr.activate_adapter(5)
    slot = mgr.lora_index_to_id.index(5)
    assert int(mgr.runtime.tables.ranks[slot].sum()) == 12
    w.apply_commands(StepCommands(evict=(5,)))
    assert store.log == ["prefetch /a/x", "get", "prefetch /a/y", "release"]  # copy done: lease back
    assert not mgr.is_resident(5) and int(mgr.runtime.tables.ranks.sum()) == 0


class _FailingStore(_Store):
    """`get` raises: a HostCacheFullError the first `full` times, or an AdapterError for `bad`."""

    def __init__(self, dims, layouts, g, bad=(), full=0):
        super().__init__(dims, layouts, g)
        self.bad, self.full = set(bad), full

    def get(self, path):
        from slora_plugin.adapters.errors import AdapterError, HostCacheFullError

        if path in self.bad:
            raise AdapterError(path.rsplit("/", 1)[1], "adapter_model.safetensors", "truncated")
        if self.full:
            self.full -= 1
            raise HostCacheFullError(path, None, "every cached adapter is leased")
        return super().get(path)


def _bare_worker(mgr, pools, store, tiny_dims):
    from types import SimpleNamespace

    from slora_plugin.pool.worker_link import HostLoadWaits, WorkerLink
    from slora_plugin.worker.adapter_copies import AdapterCopies
    from slora_plugin.worker.page_loader import PageLoader
    from slora_plugin.worker.worker import SLoRAWorker

    w = object.__new__(SLoRAWorker)
    w.adapter_store, w.page_elems = store, PAGE
    w.host_waits = HostLoadWaits()
    w._link = WorkerLink(store, w.host_waits)
    w._copies = AdapterCopies(store, PAGE, PageLoader("cpu", 0), None, "cpu", w.host_waits,
                              w._link.failures)
    w._layer_pools = [SimpleNamespace(kv_cache=p) for p in pools]
    w.model_config = SimpleNamespace(dtype=torch.float32)
    w.model_runner = SimpleNamespace(lora_manager=SimpleNamespace(model_manager=mgr))
    return w


def test_a_load_that_fails_in_the_worker_is_reported_not_fatal(vllm_cpu, tiny_dims, monkeypatch):
    """Weights that turn out unreadable after admission: the engine keeps going, the adapter is
    registered with no rows (adds nothing) and the failure goes to the scheduler."""
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    g = torch.Generator().manual_seed(3)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    layout = plan_layout({"q_proj": 4}, tiny_dims, PAGE)
    store = _FailingStore(tiny_dims, {"/a/x": layout, "/a/y": layout}, g, bad={"/a/x"})
    w = _bare_worker(mgr, pools, store, tiny_dims)
    before = [p.clone() for p in pools]
    w.apply_commands(StepCommands(load=(LoadAdapter(5, "x", "/a/x", (3,)), LoadAdapter(6, "y", "/a/y", (4,)))))
    failures = w._link.failures.take()
    assert list(failures) == [5] and "truncated" in failures[5] and "adapter_model.safetensors" in failures[5]
    assert mgr.is_resident(5) and mgr.is_resident(6)
    mgr.add_adapter(mgr.resident_model(5))
    mgr.activate_adapter(5)
    slot = mgr.lora_index_to_id.index(5)
    assert int(mgr.runtime.tables.ranks[slot].sum()) == 0  # no rows: the kernels read nothing
    for b, p in zip(before, pools):
        assert torch.equal(b[3], p[3]) and not torch.equal(b[4], p[4])  # y was written


def test_host_cache_full_within_one_step_waits_for_its_copies_and_retries(vllm_cpu, tiny_dims,
                                                                          monkeypatch):
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    g = torch.Generator().manual_seed(4)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    layout = plan_layout({"q_proj": 4}, tiny_dims, PAGE)
    store = _FailingStore(tiny_dims, {"/a/x": layout, "/a/y": layout}, g, full=1)
    w = _bare_worker(mgr, pools, store, tiny_dims)
    w.apply_commands(StepCommands(load=(LoadAdapter(5, "x", "/a/x", (3,)),)))
    assert store.full == 0 and mgr.is_resident(5) and w._link.failures.take() == {}
    assert store.log == ["prefetch /a/x", "get"]


def test_a_step_holds_at_most_half_the_host_cache_in_leases(vllm_cpu, tiny_dims, monkeypatch):
    """Past half the host cache, the step's copies are waited for and their leases given back
    before the next read, so that read never waits for room only this step could free."""
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    g = torch.Generator().manual_seed(5)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    layout = plan_layout({"q_proj": 4}, tiny_dims, PAGE)
    store = _Store(tiny_dims, {"/a/x": layout, "/a/y": layout}, g)
    one = store.raws["/a/x"].layout.nbytes
    store.cache.arena.capacity = 3 * one  # half: one copy and a half
    w = _bare_worker(mgr, pools, store, tiny_dims)
    w.apply_commands(StepCommands(load=(LoadAdapter(5, "x", "/a/x", (3,)), LoadAdapter(6, "y", "/a/y", (4,)))))
    assert store.log == ["prefetch /a/x", "prefetch /a/y", "get", "get", "release", "release"]
    store.cache.arena.capacity = 1 << 30  # room: the leases stay until the copies are seen done
    w.apply_commands(StepCommands(load=(LoadAdapter(7, "x", "/a/x", (5,)), LoadAdapter(8, "y", "/a/y", (6,)))))
    assert store.log[6:] == ["prefetch /a/x", "prefetch /a/y", "get", "get"]


def test_mapping_updates_only_the_token_slots(vllm_cpu, tiny_dims, monkeypatch):
    """vLLM's update_metadata (its own kernels' metadata, with host-device syncs on a GPU) is
    never called; the per-token slots still follow the mapping and the slot layout."""
    g = torch.Generator().manual_seed(6)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch)
    pools = _layer_key_pools(mgr, tiny_dims)
    _install_adapter(mgr, pools, tiny_dims, 4, {"q_proj": 2}, list(range(1, 20)), g)
    _install_adapter(mgr, pools, tiny_dims, 6, {"o_proj": 2}, list(range(20, 40)), g)
    for wrapper in mgr.punica_wrapper_mapping.values():
        monkeypatch.setattr(wrapper, "update_metadata", lambda *a, **k: pytest.fail("called"))
    token_map = (6, 6, 0, 4)
    mgr.set_adapter_mapping(LoRAMapping(token_map, (6, 0, 4), is_prefill=True))
    slot = {i: mgr.lora_index_to_id.index(i) for i in (4, 6)}
    expect = [slot[i] if i else -1 for i in token_map]
    assert mgr.runtime.token_slot[:4].tolist() == expect
    assert mgr.runtime.token_slot[4:].eq(-1).all()
    assert mgr.runtime.adapters == 2  # the step's distinct adapters, for the kernels' tiles
    mgr.set_adapter_mapping(LoRAMapping((0, 0, 0), (0,), is_prefill=False))
    assert mgr.runtime.adapters == 0


def test_mixed_batch_of_plain_and_compressed_adapters(vllm_cpu, tiny_dims, monkeypatch, tmp_path):
    """One batch: a plain adapter, two adapters of a compressed collection (written by the real
    compressor from PEFT adapters, read by the host store, cores in KV pages, bases resident)
    and no adapter. Each token's output is the base layer plus its adapter's delta: the
    collection's U Σ Vᵀ (the compressed op's contract) and, K being the sum of the ranks, the
    uncompressed PEFT adapter's s B A within fp32 tolerance."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from slora_plugin.adapters.compressed import read_cluster_bases
    from slora_plugin.adapters.peft_format import tensor_name, write_random_adapter
    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.compress.collection import CompressedCollection
    from slora_plugin.worker.compressed_bases import resident_bases
    from slora_plugin.worker.tables import core_rows

    g = torch.Generator().manual_seed(2)
    members = {"c1": (2, ["q_proj", "v_proj", "down_proj"]), "c2": (3, ["q_proj", "gate_proj", "o_proj"])}
    src, root = tmp_path / "src", tmp_path / "root"
    for i, (name, (rank, mods)) in enumerate(members.items()):
        write_random_adapter(str(src / name), tiny_dims, rank, mods, alpha=3.0, seed=20 + i,
                             dtype=torch.float32)
    compress_collection(str(src), str(root / "coll"), 5, dims=tiny_dims, dtype=torch.float32)
    coll = CompressedCollection(str(root / "coll"))

    model, mgr, base = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=3)
    pools = _layer_key_pools(mgr, tiny_dims)
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    w7 = _install_adapter(mgr, pools, tiny_dims, 7, {"q_proj": 4, "o_proj": 8, "up_proj": 3}, free[:20], g)
    with AdapterStore(tiny_dims, PAGE, torch.float32, adapter_dir=str(root), max_rank=16,
                      host_cache_bytes=1 << 20, loader_threads=1) as store:
        read = {}
        for lid, n in ((11, "c1"), (12, "c2")):
            with store.get(f"coll/{n}") as lease:
                read[lid] = SimpleNamespace(spec=lease.spec, cores=lease.raw.clone())
    spec = read[11].spec
    bases = read_cluster_bases(spec.name, spec.collection, spec.manifest, spec.cluster, torch.float32)
    rb = resident_bases([((spec.collection, spec.cluster), bases)], spec.manifest.modules,
                        tiny_dims.num_hidden_layers, spec.manifest.rank, torch.float32, "cpu")
    assert rb.nbytes > 0
    mgr.runtime.serve_compressed(rb, diagonal=False, dtype=torch.float32)
    first = 20
    for lid, ad in read.items():
        blocks = free[first:first + ad.spec.num_pages]
        first += ad.spec.num_pages
        for layer, pool in enumerate(pools):
            pool[blocks] = ad.cores[layer]
        mgr.add_dummy(lid, 8)  # the model manager's bookkeeping; the slot is written below
        mgr.activate_adapter(lid)
        mgr.runtime.tables.write_cores(mgr.lora_index_to_id.index(lid),
                                       core_rows(ad.spec.layout, blocks, rb.group_of((spec.collection, 0))))
    names = {11: "c1", 12: "c2"}
    req = [(7, 3), (0, 2), (11, 4), (12, 2), (7, 1)]
    token_map = _map_requests(mgr, req)
    x_in = _layer_inputs(tiny_dims)

    def peft(name, layer):  # the uncompressed adapter as (A, s B) per module
        rank, mods = members[name]
        with safe_open(str(src / name / "adapter_model.safetensors"), "pt") as f:
            return {m: (f.get_tensor(tensor_name(layer, m, "A")),
                        f.get_tensor(tensor_name(layer, m, "B")) * (3.0 / rank)) for m in mods}

    def dense(name, layer):  # the collection's U Σ Vᵀ, as (Vᵀ-side, U Σ) factors
        return {m: (torch.eye(coll.manifest.modules[m][0]), coll.delta(name, layer, m))
                for m in members[name][1]}

    for name, layer, suffix, x, y in _layer_outputs(vllm_cpu, mgr, len(token_map), x_in, g):
        expect, uncompressed = x @ base[name].t(), x @ base[name].t()
        for t, lid in enumerate(token_map):
            if lid == 7:
                d = _delta(x[t:t + 1], w7[layer], suffix, tiny_dims)[0]
                expect[t] += d
                uncompressed[t] += d
            elif lid:
                expect[t] += _delta(x[t:t + 1], dense(names[lid], layer), suffix, tiny_dims)[0]
                uncompressed[t] += _delta(x[t:t + 1], peft(names[lid], layer), suffix, tiny_dims)[0]
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(y, uncompressed, rtol=1e-4, atol=1e-4, msg=name)
    # a slot holds either kind: re-using a compressed adapter's slot for a plain one drops its cores
    slot = mgr.lora_index_to_id.index(11)
    assert int(mgr.runtime.tables.cores.has_core[slot].sum()) > 0
    mgr.mark_resident(11, plan_layout({"o_proj": 2}, tiny_dims, PAGE), tuple(free[-1:]))
    assert int(mgr.runtime.tables.cores.has_core[slot].sum()) == 0
    assert int(mgr.runtime.tables.ranks[slot].sum()) == 2
    ops.install(None)


def _serving_worker(mgr, pools, root, tiny_dims, monkeypatch):
    """A bare worker over a real host store of `root`, its collections served as at engine
    start (`_serve_collections`, with the toy model's dims)."""
    from types import SimpleNamespace

    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.worker import worker as worker_mod

    store = AdapterStore(tiny_dims, PAGE, torch.float32, adapter_dir=str(root), max_rank=16,
                         host_cache_bytes=1 << 20, loader_threads=1)
    w = _bare_worker(mgr, pools, store, tiny_dims)
    w.slora_config = SimpleNamespace(adapter_dir=str(root))
    w.vllm_config, w.device = None, torch.device("cpu")
    w.model_runner.model_memory_usage = 1000
    w._compressed_groups = frozenset()
    monkeypatch.setattr(worker_mod, "engine_dims", lambda _vc: tiny_dims)
    w._serve_collections()
    w._copies.compressed_groups = w._compressed_groups  # as `_open_store` builds it after
    return w, store


def test_worker_loads_compressed_and_plain_adapters_for_one_batch(vllm_cpu, tiny_dims, monkeypatch,
                                                                   tmp_path):
    """Engine path on CPU: the worker serves the adapter directory's collection at start
    (bases resident, bytes counted as model memory), the scheduler's load commands bring a
    plain adapter and two compressed ones into KV pages through the real host store,
    `AdapterCopies` and the LoRA manager, and one batch mixing them (and no adapter) equals
    the base layer plus each token's uncompressed PEFT adapter (K = the sum of the ranks)."""
    from safetensors import safe_open

    from slora_plugin.adapters.peft_format import tensor_name, write_random_adapter
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    members = {"c1": (2, ["q_proj", "v_proj", "down_proj"]), "c2": (3, ["q_proj", "gate_proj", "o_proj"]),
               "p": (4, ["q_proj", "o_proj", "up_proj"])}
    src, root = tmp_path / "src", tmp_path / "root"
    for i, (name, (rank, mods)) in enumerate(members.items()):
        where = root / name if name == "p" else src / name
        write_random_adapter(str(where), tiny_dims, rank, mods, alpha=3.0, seed=30 + i,
                             dtype=torch.float32)
    compress_collection(str(src), str(root / "coll"), 5, dims=tiny_dims, dtype=torch.float32)

    _, mgr, base = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=3)
    pools = _layer_key_pools(mgr, tiny_dims)
    w, store = _serving_worker(mgr, pools, root, tiny_dims, monkeypatch)
    rb = mgr.runtime.compressed
    assert rb is not None and rb.nbytes > 0 and mgr.runtime.tables.cores is not None
    assert w.model_runner.model_memory_usage == 1000 + rb.nbytes
    names = {7: "p", 11: "coll/c1", 12: "coll/c2"}
    loads, first = [], 3
    for lid, name in names.items():
        spec = store.spec(name)
        loads.append(LoadAdapter(lid, name, spec.path, tuple(range(first, first + spec.num_pages))))
        first += spec.num_pages + 1
    w.apply_commands(StepCommands(load=tuple(loads)))
    assert w._link.failures.take() == {}
    for lid in names:
        assert mgr.is_resident(lid)
        mgr.add_adapter(mgr.resident_model(lid))
        mgr.activate_adapter(lid)
    cores = mgr.runtime.tables.cores
    assert int(cores.has_core[mgr.lora_index_to_id.index(7)].sum()) == 0
    assert int(cores.has_core[mgr.lora_index_to_id.index(11)].sum()) > 0
    assert int(mgr.runtime.tables.ranks[mgr.lora_index_to_id.index(11)].sum()) == 0
    req = [(7, 3), (0, 2), (11, 4), (12, 2), (7, 1)]
    token_map = _map_requests(mgr, req)
    x_in = _layer_inputs(tiny_dims)

    def peft(name, layer):  # the uncompressed adapter as (A, s B) per module
        rank, mods = members[name]
        where = (root if name == "p" else src) / name / "adapter_model.safetensors"
        with safe_open(str(where), "pt") as f:
            return {m: (f.get_tensor(tensor_name(layer, m, "A")),
                        f.get_tensor(tensor_name(layer, m, "B")) * (3.0 / rank)) for m in mods}

    g = torch.Generator().manual_seed(3)
    for name, layer, suffix, x, y in _layer_outputs(vllm_cpu, mgr, len(token_map), x_in, g):
        expect = x @ base[name].t()
        for t, lid in enumerate(token_map):
            if lid:
                member = names[lid].rsplit("/", 1)[-1]
                expect[t] += _delta(x[t:t + 1], peft(member, layer), suffix, tiny_dims)[0]
        torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4, msg=name)
    w.apply_commands(StepCommands(evict=(11,)))
    assert not mgr.is_resident(11) and int(cores.has_core[mgr.lora_index_to_id.index(12)].sum()) > 0
    store.close()
    ops.install(None)


def test_a_directory_without_collections_serves_as_before(vllm_cpu, tiny_dims, monkeypatch,
                                                          tmp_path):
    """No collection in the adapter directory: no core tables, no bases, no workspace, the
    model's memory unchanged, and loads never look at a spec before their lease."""
    from slora_plugin.adapters.peft_format import write_random_adapter

    write_random_adapter(str(tmp_path / "p"), tiny_dims, 4, ["q_proj"], seed=1, dtype=torch.float32)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    w, store = _serving_worker(mgr, pools, tmp_path, tiny_dims, monkeypatch)
    rt = mgr.runtime
    assert rt.compressed is None and rt.tables.cores is None and rt._workspace is None
    assert w.model_runner.model_memory_usage == 1000 and w._copies.compressed_groups == frozenset()
    store.close()
    ops.install(None)


def test_a_collection_added_after_start_is_refused_alone(vllm_cpu, tiny_dims, monkeypatch, tmp_path):
    """Bases are read at engine start: a collection that appears later is refused at
    resolution (`add_lora`, a 400) and, if a load still comes, reported as a failed load (the
    engine keeps serving)."""
    from types import SimpleNamespace

    from slora_plugin.adapters.errors import AdapterError
    from slora_plugin.adapters.peft_format import write_random_adapter
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.pool.commands import LoadAdapter, StepCommands

    write_random_adapter(str(tmp_path / "root" / "p"), tiny_dims, 4, ["q_proj"], seed=1,
                         dtype=torch.float32)
    _, mgr, _ = _manager(vllm_cpu, tiny_dims, monkeypatch, slots=2)
    pools = _layer_key_pools(mgr, tiny_dims)
    w, store = _serving_worker(mgr, pools, tmp_path / "root", tiny_dims, monkeypatch)
    write_random_adapter(str(tmp_path / "src" / "a"), tiny_dims, 2, ["q_proj"], seed=2,
                         dtype=torch.float32)
    compress_collection(str(tmp_path / "src"), str(tmp_path / "root" / "coll"), 2, dims=tiny_dims,
                        dtype=torch.float32)
    spec = store.spec("coll/a")
    with pytest.raises(AdapterError, match="did not load at start"):
        w.add_lora(SimpleNamespace(lora_path=spec.path))
    w.apply_commands(StepCommands(load=(LoadAdapter(3, "coll/a", spec.path,
                                                    tuple(range(spec.num_pages))),)))
    assert 3 in w._link.failures.take()
    store.close()
    ops.install(None)
