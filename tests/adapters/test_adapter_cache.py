"""Host cache: one load per adapter however many callers, the arena's budget and invariants,
leases that pin, LRU eviction, prefetch."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_plugin.adapters import AdapterStore
from slora_plugin.adapters.arena import ALIGN, Arena
from slora_plugin.adapters.errors import HostCacheFullError
from slora_plugin.adapters.host_cache import host_bytes
from slora_plugin.adapters.peft_format import write_random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_many_threads_one_adapter_one_load(tmp_path, tiny_dims):
    write_random_adapter(str(tmp_path / "a"), tiny_dims, 16, TARGETS)
    store = AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                         host_cache_bytes=1 << 20, loader_threads=4)
    barrier, results, errors = threading.Barrier(16), [], []

    def ask():
        barrier.wait()
        try:
            with store.get("a") as lease:
                results.append(lease.raw.buffer.data_ptr())
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = store.stats()
    store.close()
    assert not errors and len(set(results)) == 1
    assert s["loads"] == 1 and s["misses"] == 1 and s["hits"] + s["joins"] == 15


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 5 * ALIGN)), max_size=60),
       capacity=st.integers(ALIGN, 40 * ALIGN))
def test_arena_never_exceeds_capacity_and_coalesces(ops, capacity):
    arena, live = Arena(capacity), []
    for is_alloc, n in ops:
        if is_alloc or not live:
            off = arena.alloc(n)
            if off is not None:
                assert off % ALIGN == 0 and off + Arena.rounded(n) <= arena.capacity
                live.append(off)
        else:
            arena.free(live.pop(n % len(live)))
        assert arena.used_bytes <= arena.capacity <= capacity
        arena.check()
    for off in live:
        arena.free(off)
    arena.check()
    assert arena.largest_free == arena.capacity  # everything coalesced back into one block


def test_lru_eviction_respects_leases_and_budget(tmp_path, tiny_dims):
    for i in range(6):
        write_random_adapter(str(tmp_path / f"a{i}"), tiny_dims, 8, TARGETS, seed=i)
    probe = AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                         host_cache_bytes=1 << 20, loader_threads=1)
    one = Arena.rounded(host_bytes(probe.spec("a0"), tiny_dims, torch.float16))
    probe.close()
    store = AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                         host_cache_bytes=3 * one, loader_threads=2, wait_timeout_s=0.5)
    held = store.get("a0")  # leased: must survive any pressure
    snapshot = held.raw.buffer.clone()
    for i in range(1, 6):
        with store.get(f"a{i}"):
            s = store.stats()
            assert s["bytes_used"] <= s["capacity_bytes"] == 3 * one
    assert torch.equal(held.raw.buffer, snapshot)
    s = store.stats()
    assert s["evictions"] >= 3 and s["leased"] == 1
    with store.get("a4"):  # most recent: still cached
        pass
    assert store.stats()["hits"] >= 1
    # Everything leased and no room: a transient error, not remembered.
    l1, l2 = store.get("a1"), store.get("a2")
    with pytest.raises(HostCacheFullError):
        store.get("a3")
    l1.release()
    with store.get("a3"):
        pass
    for lease in (held, l2):
        lease.release()
    store.close()


def test_prefetch_does_not_block_and_fills_the_cache(tmp_path, tiny_dims):
    for i in range(3):
        write_random_adapter(str(tmp_path / f"p{i}"), tiny_dims, 8, TARGETS, seed=i)
    with AdapterStore(tiny_dims, 512, torch.bfloat16, adapter_dir=str(tmp_path), max_rank=16,
                      host_cache_bytes=1 << 20, loader_threads=2) as store:
        store.prefetch(["p0", "p1", "p2", "p1", "missing", "../escape"])
        for i in range(3):
            with store.get(f"p{i}") as lease:
                assert lease.raw.layout.dtype == torch.bfloat16
        s = store.stats()
        assert s["loads"] == 3 and s["prefetches"] == 3 and s["misses"] + s["hits"] + s["joins"] == 3


def test_reads_split_over_threads_give_the_same_raw_bytes(tmp_path, tiny_dims):
    from concurrent.futures import ThreadPoolExecutor

    from slora_plugin.adapters.loader import read_raw
    from slora_plugin.raw_format import RawAdapter, raw_layout

    write_random_adapter(str(tmp_path / "s"), tiny_dims, 8, TARGETS + ["down_proj"], seed=4)
    with AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                      host_cache_bytes=1 << 20, loader_threads=1) as store:
        spec = store.spec("s")
    layout = raw_layout(spec.layout, tiny_dims.num_hidden_layers, torch.float16)
    whole = RawAdapter(torch.zeros(layout.nbytes, dtype=torch.uint8), layout)
    read_raw(spec, tiny_dims, whole)
    with ThreadPoolExecutor(3) as readers:
        for parts in (2, 3, 7, 100):
            split = RawAdapter(torch.full((layout.nbytes,), 7, dtype=torch.uint8), layout)
            read_raw(spec, tiny_dims, split, readers, parts)
            used = 64 + sum(m.rank * (m.in_features + m.out_features) for m in layout.modules) * 2
            assert torch.equal(split.records()[:, :used], whole.records()[:, :used])
