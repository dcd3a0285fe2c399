"""The host store as the scheduler's readiness oracle (ready/start without file-system access)
and the worker's measure of blocking loads (Lease.waited_s)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

import slora_plugin.adapters.host_cache as host_cache
from slora_plugin.adapters import AdapterStore
from slora_plugin.adapters.arena import Arena
from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.host_cache import host_bytes
from slora_plugin.adapters.peft_format import write_random_adapter

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def gated_reads(monkeypatch):
    """Disk reads wait for `gate` (set it to let them finish); `started` counts reads begun."""
    gate, started = threading.Event(), []
    real = host_cache.read_raw

    def read_raw(spec, *args, **kwargs):
        started.append(spec.name)
        assert gate.wait(10), "test gate never opened"
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(host_cache, "read_raw", read_raw)
    return gate, started


def make_store(tmp_path, dims, names, capacity=1 << 20, threads=2) -> AdapterStore:
    for name in names:
        write_random_adapter(str(tmp_path / name), dims, 8, TARGETS)
    return AdapterStore(dims, 512, torch.float16, adapter_dir=str(tmp_path), max_rank=16,
                        host_cache_bytes=capacity, loader_threads=threads)


def wait_until(cond, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def gated_store(tmp_path, tiny_dims, gated_reads):
    """A store over one adapter "a" whose disk reads wait for the gate; (store, gate, started).
    The gate is opened and the store closed at the end, whatever the test did."""
    gate, started = gated_reads
    store = make_store(tmp_path, tiny_dims, ["a"])
    yield store, gate, started
    gate.set()
    store.close()


def test_ready_after_start_and_load_without_waiting(tmp_path, gated_store):
    store, gate, started = gated_store
    path = str(tmp_path / "a")
    assert not store.ready(path)  # never specified: not ready, and start specifies it
    store.start(path)
    wait_until(lambda: started == ["a"])
    assert not store.ready(path) and store.cache.path_busy(os.path.realpath(path))
    store.start(path)  # already loading: no second read
    gate.set()
    wait_until(lambda: store.ready(path))
    with store.get(path) as lease:
        assert lease.waited_s == 0.0
    assert started == ["a"] and store.stats()["loads"] == 1


def test_a_get_that_waits_for_the_disk_says_how_long(gated_store):
    store, gate, _ = gated_store
    threading.Timer(0.2, gate.set).start()
    t0 = time.perf_counter()
    with store.get("a") as lease:
        took = time.perf_counter() - t0
        assert 0.15 <= lease.waited_s <= took
    with store.get("a") as again:
        assert again.waited_s == 0.0


def test_joining_a_prefetch_counts_as_a_wait(gated_store):
    store, gate, started = gated_store
    store.prefetch(["a"])
    wait_until(lambda: started == ["a"])
    threading.Timer(0.1, gate.set).start()
    with store.get("a") as lease:
        assert lease.waited_s > 0.05
    assert store.stats()["joins"] == 1


def test_evicted_copy_is_no_longer_ready_and_a_ready_check_protects_it(tmp_path, tiny_dims):
    names = ["a", "b", "c"]
    store = make_store(tmp_path, tiny_dims, names)
    one = host_bytes(store.spec("a"), tiny_dims, torch.float16)
    store.close()
    store = make_store(tmp_path, tiny_dims, names, capacity=2 * Arena.rounded(one), threads=1)
    try:
        for n in ("a", "b"):
            store.start(n)
        wait_until(lambda: store.ready("a") and store.ready("b"))
        assert store.ready("a")  # the check makes "a" the most recently used: "b" goes first
        store.start("c")
        wait_until(lambda: store.ready("c"))
        assert store.ready("a") and not store.ready("b")
    finally:
        store.close()


def test_bad_or_missing_adapter_is_ready_so_its_request_fails_instead_of_waiting(tmp_path,
                                                                                  tiny_dims):
    store = make_store(tmp_path, tiny_dims, ["a"])
    try:
        store.start("nope")  # no such adapter: get raises at once, nothing to wait for
        assert store.ready("nope")
        write_random_adapter(str(tmp_path / "nope"), tiny_dims, 8, TARGETS)
        store.spec("nope")  # found now: back to the ordinary rule
        assert not store.ready("nope")
        store.start("nope")
        wait_until(lambda: store.ready("nope"))
    finally:
        store.close()


def test_failed_load_is_ready_and_forgotten_when_the_files_change(tmp_path, tiny_dims):
    store = make_store(tmp_path, tiny_dims, ["a"])
    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated: the load fails, the spec does not
    try:
        store.start("a")
        wait_until(lambda: store.ready("a"))
        with pytest.raises(AdapterError):
            store.get("a")
        shutil.rmtree(tmp_path / "a")
        write_random_adapter(str(tmp_path / "a"), tiny_dims, 8, TARGETS)
        with store.get("a") as lease:  # new files: loaded afresh, the old failure forgotten
            assert lease.waited_s > 0
        assert store.ready("a")
    finally:
        store.close()


def test_error_names_the_file_once_a_host_load_failed(tmp_path, tiny_dims):
    """Truncated weights pass the config check; the scheduler learns from `error` that the
    adapter cannot be loaded (and admits nothing for it), while a good one has no error."""
    store = make_store(tmp_path, tiny_dims, ["bad", "good"])
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    try:
        for n in ("bad", "good"):
            assert store.error(n) is None  # nothing known yet
            store.start(n)
        wait_until(lambda: store.ready("bad") and store.ready("good"))
        reason = store.error("bad")
        assert reason is not None and "bad" in reason and "adapter_model.safetensors" in reason
        assert store.error("good") is None
        with pytest.raises(AdapterError):
            store.get("bad")
    finally:
        store.close()


def test_error_of_an_adapter_whose_config_is_refused(tmp_path, tiny_dims):
    store = make_store(tmp_path, tiny_dims, ["a"])
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    try:
        store.start("a")
        assert store.ready("a") and "adapter_config.json" in store.error("a")
    finally:
        store.close()


def test_prefetch_starts_only_what_fits_half_the_host_cache(tmp_path, tiny_dims):
    """A step's loads (or queued hints) beyond half the host cache are not started: they would
    evict the first ones, or make the loader threads wait for room the step's leases hold."""
    names = ["a", "b", "c", "d"]
    store = make_store(tmp_path, tiny_dims, names)
    one = host_bytes(store.spec("a"), tiny_dims, torch.float16)
    store.close()
    store = make_store(tmp_path, tiny_dims, names, capacity=5 * Arena.rounded(one), threads=1)
    try:
        store.prefetch(["a", "b", "c", "d"])  # room for two (half of five copies)
        wait_until(lambda: store.ready("a") and store.ready("b"))
        assert not any(store.cache.path_busy(store.locate(n)[1]) for n in ("c", "d"))
        store.prefetch(["a", "b", "c"])  # cached ones take no room: c starts
        wait_until(lambda: store.ready("c"))
        assert store.stats()["loads"] == 3
    finally:
        store.close()


def test_prefetch_skips_an_adapter_larger_than_half_the_cache(tmp_path, tiny_dims):
    """One adapter larger than half the host cache is left to its own `get`; the ones behind
    it still start."""
    store = make_store(tmp_path, tiny_dims, ["small"])
    write_random_adapter(str(tmp_path / "big"), tiny_dims, 16,
                         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    small = host_bytes(store.spec("small"), tiny_dims, torch.float16)
    big = host_bytes(store.spec("big"), tiny_dims, torch.float16)
    store.close()
    assert big > 2 * small
    capacity = Arena.rounded(big) + Arena.rounded(small)  # half of it < big, >= small
    store = make_store(tmp_path, tiny_dims, ["small"], capacity=capacity, threads=1)
    try:
        store.prefetch(["big", "small"])
        wait_until(lambda: store.ready("small"))
        assert not store.cache.path_busy(store.locate("big")[1])
    finally:
        store.close()
