"""Pure helpers of the worker: page loads (CPU path), scope refusal, KV layout checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slora_plugin.patches.kv_pool import KVLayoutError, check_blocks_first
from slora_plugin.worker.page_loader import PageLoader
from slora_plugin.worker.scope import scope_problems


def test_page_loader_writes_every_page_of_every_layer_at_its_blocks(tiny_dims):
    """CPU path of the worker's load: raw records -> the pages the reference writer gives, at
    the scheduler's block ids; no other block touched; a wrong block count is refused."""
    from raw_pages import render_pages
    from slora_plugin.layout import plan_layout
    from slora_plugin.raw_format import RawAdapter, raw_layout

    layout = plan_layout({"q_proj": 3, "o_proj": 2}, tiny_dims, 128)
    rl = raw_layout(layout, tiny_dims.num_hidden_layers, torch.float16)
    raw = RawAdapter(torch.zeros(rl.nbytes, dtype=torch.uint8), rl)
    g = torch.Generator().manual_seed(0)
    for rm in rl.modules:
        raw.a(rm.module).copy_(torch.randn(raw.a(rm.module).shape, generator=g))
        raw.b(rm.module).copy_(torch.randn(raw.b(rm.module).shape, generator=g))
        raw.scales()[:, rm.index] = 3.0
        raw.layer_ranks()[:, rm.index] = rm.rank
    blocks = [7, 8, 1, 4, 2][:layout.num_pages]
    pools = [torch.zeros(10 * 128, dtype=torch.float16) for _ in range(tiny_dims.num_hidden_layers)]
    PageLoader("cpu", 0).load(pools, raw, layout, blocks)
    pages = render_pages(raw, layout, kernel=False)
    others = [b for b in range(10) if b not in blocks]
    for l, pool in enumerate(pools):
        assert torch.equal(pool.view(10, 128)[blocks], pages[l])
        assert int((pool.view(10, 128)[others] != 0).sum()) == 0
    with pytest.raises(ValueError, match="pages but got"):
        PageLoader("cpu", 0).load(pools, raw, layout, blocks[:-1])


def _cfg(tp=1, pp=1, kv=None, sleep=False, sharded=False, lora=True):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        decode_context_parallel_size=1),
        kv_transfer_config=kv, model_config=SimpleNamespace(enable_sleep_mode=sleep),
        lora_config=SimpleNamespace(fully_sharded_loras=sharded) if lora else None)


def test_scope_refusals_name_the_setting():
    assert scope_problems(_cfg()) == []
    assert "tensor_parallel_size=2" in scope_problems(_cfg(tp=2))[0]
    assert "pipeline_parallel_size=2" in scope_problems(_cfg(pp=2))[0]
    assert "KV connector" in scope_problems(_cfg(kv=object()))[0]
    assert "sleep mode" in scope_problems(_cfg(sleep=True))[0]
    assert "fully_sharded_loras" in scope_problems(_cfg(sharded=True))[0]
    assert "not enabled" in scope_problems(_cfg(lora=False))[0]


def test_blocks_first_check():
    # FlashAttention 0.26: (num_blocks, kv_heads, block, 2*head) viewed with stride order 0,2,1,3
    nb, heads, bs, hd = 6, 2, 4, 8
    kv = torch.zeros(nb, bs, heads, hd, dtype=torch.float16).permute(0, 2, 1, 3)
    page = bs * heads * hd * 2
    check_blocks_first(kv, nb, page, "l0")
    with pytest.raises(KVLayoutError, match="blocks-first"):
        check_blocks_first(torch.zeros(2, nb, heads * bs * hd // 2, dtype=torch.float16), nb, page, "l0")
    with pytest.raises(KVLayoutError, match="expected"):
        check_blocks_first(kv, nb + 1, page, "l0")


def test_add_lora_refuses_a_broken_adapter_naming_it(tmp_path, tiny_dims):
    """`vllm serve`'s resolver calls the worker's add_lora: a broken config must raise there,
    with the adapter, the file and the reason, while a valid adapter is accepted."""
    from vllm.lora.request import LoRARequest

    from slora_plugin.adapters.errors import AdapterError
    from slora_plugin.adapters.peft_format import write_random_adapter
    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.worker.worker import SLoRAWorker

    good = write_random_adapter(str(tmp_path / "good"), tiny_dims, 4, ["q_proj"])
    bad = write_random_adapter(str(tmp_path / "bad"), tiny_dims, 4, ["q_proj"], use_dora=True)
    store = AdapterStore(tiny_dims, 256, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                         host_cache_bytes=1 << 20, loader_threads=1)
    w = object.__new__(SLoRAWorker)
    w.adapter_store = store
    try:
        assert w.add_lora(LoRARequest("good", 1, good)) is True
        with pytest.raises(AdapterError, match=r"(?s)bad.*adapter_config.json.*(?i:dora)"):
            w.add_lora(LoRARequest("bad", 2, bad))
    finally:
        store.close()


def test_shutdown_drains_copies_closes_the_store_then_runs_vllms(tmp_path, tiny_dims, monkeypatch):
    """Issue 17 (the teardown abort): before vLLM's own shutdown, the worker gives back the
    leases of its in-flight copies and closes the host store, whose loader threads are then
    joined; a second shutdown does nothing more; vLLM's runs even if draining fails."""
    import threading
    from contextlib import ExitStack

    from vllm.v1.worker.gpu_worker import Worker

    from slora_plugin.adapters.peft_format import write_random_adapter
    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.worker.adapter_copies import AdapterCopies, _InFlight
    from slora_plugin.worker.worker import SLoRAWorker

    names = [f"a{i}" for i in range(6)]
    for i, n in enumerate(names):
        write_random_adapter(str(tmp_path / n), tiny_dims, 4, ["q_proj", "v_proj"], seed=i)
    store = AdapterStore(tiny_dims, 256, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                         host_cache_bytes=1 << 22, loader_threads=2)
    calls = []
    monkeypatch.setattr(Worker, "shutdown", lambda self: calls.append(("vllm", self.adapter_store)))
    w = object.__new__(SLoRAWorker)
    copies = AdapterCopies(store, 256, page_loader=None, copy_stream=None, device="cpu",
                           host_waits=None, failures=None)
    w.adapter_store, w._copies, w._link = store, copies, object()
    lease = ExitStack()
    held = store.get("a0")
    lease.callback(held.release)
    copies._in_flight = [_InFlight(None, lease, 1)]
    store.prefetch(names[1:])  # loads still queued or running at shutdown
    w.shutdown()
    assert calls == [("vllm", None)] and copies._in_flight == [] and w._copies is None
    assert w._link is None
    assert held._entry.refs == 0 and held._released  # the in-flight copy's lease was given back
    with pytest.raises(RuntimeError, match="closed"):
        store.get("a1")
    assert not [t for t in threading.enumerate() if t.name.startswith(("slora-load", "slora-read"))]
    w.shutdown()  # idempotent
    assert calls == [("vllm", None), ("vllm", None)]

    w2 = object.__new__(SLoRAWorker)
    store2 = AdapterStore(tiny_dims, 256, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                          host_cache_bytes=1 << 22, loader_threads=1)
    failing_stream = SimpleNamespace(synchronize=lambda: (_ for _ in ()).throw(RuntimeError("CUDA error")))
    copies2 = AdapterCopies(store2, 256, page_loader=None, copy_stream=failing_stream, device="cpu",
                            host_waits=None, failures=None)
    copies2._in_flight = [_InFlight(None, ExitStack(), 1)]
    w2.adapter_store, w2._copies, w2._link = store2, copies2, None
    with pytest.raises(RuntimeError, match="CUDA error"):
        w2.shutdown()
    assert calls[-1] == ("vllm", None)
    with pytest.raises(RuntimeError, match="closed"):
        store2.get("a1")
