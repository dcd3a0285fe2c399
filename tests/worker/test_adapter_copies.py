"""The worker's side of a step's commands (worker/adapter_copies.py) with plain objects: a fake
host store, LoRA manager and page loader (no vLLM worker, no GPU). The same paths through the
real LoRA manager and page loader are in test_paged_layers.py."""

from __future__ import annotations

from contextlib import ExitStack
from types import SimpleNamespace

import pytest

from slora_plugin.adapters.errors import AdapterError, HostCacheFullError
from slora_plugin.pool.commands import LoadAdapter, StepCommands
from slora_plugin.pool.worker_link import HostLoadWaits, LoadFailures
from slora_plugin.worker.adapter_copies import AdapterCopies, _InFlight, apply_commands

PAGE = 64


class Lease:
    def __init__(self, path, num_pages, nbytes, log, waited_s):
        self.spec = SimpleNamespace(num_pages=num_pages, layout=f"layout {path}")
        self.raw = SimpleNamespace(path=path)
        self.path, self.log, self.waited_s, self.nbytes = path, log, waited_s, nbytes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.append(f"release {self.path}")


class Store:
    """get -> Lease (raises for `bad`, HostCacheFullError the first `full` times); prefetch."""

    def __init__(self, log, pages=1, nbytes=100, capacity=1 << 20, bad=(), full=0, waited_s=0.0):
        self.log, self.pages, self.nbytes, self.bad, self.full = log, pages, nbytes, set(bad), full
        self.step_share_bytes = capacity // 2
        self.waited_s = waited_s

    def get(self, path):
        if path in self.bad:
            raise AdapterError(path, "adapter_model.safetensors", "truncated")
        if self.full:
            self.full -= 1
            self.log.append(f"full {path}")
            raise HostCacheFullError(path, None, "every cached adapter is leased")
        self.log.append(f"get {path}")
        return Lease(path, self.pages, self.nbytes, self.log, self.waited_s)

    def prefetch(self, paths):
        self.log.append(f"prefetch {list(paths)}")


class Manager:
    def __init__(self, log):
        self.log = log
        self.resident: dict[int, tuple] = {}
        self.groups: dict[int, object] = {}

    def evict(self, lora_id):
        self.log.append(f"evict {lora_id}")

    def mark_resident(self, lora_id, layout, block_ids, group=None):
        self.log.append(f"resident {lora_id}")
        self.resident[lora_id] = (layout, block_ids)
        self.groups[lora_id] = group


class Loader:
    def __init__(self, log):
        self.log = log

    def load(self, pools, raw, layout, block_ids):
        self.log.append(f"write {raw.path} -> {list(block_ids)}")


def copies_of(store, log, waits=None, failures=None):
    return AdapterCopies(store, PAGE, Loader(log), None, "cpu", waits or HostLoadWaits(),
                         failures or LoadFailures())


def load(i, blocks=(1,)):
    return LoadAdapter(i, f"a{i}", f"/a/{i}", tuple(blocks))


def test_a_step_evicts_then_loads_then_prefetches():
    log: list[str] = []
    waits = HostLoadWaits()
    copies = copies_of(Store(log, waited_s=0.5), log, waits)
    mgr = Manager(log)
    pools_asked = []
    apply_commands(StepCommands(evict=(7,), load=(load(1), load(2, (3,))),
                                prefetch=(("a9", "/a/9"),)), mgr, copies,
                   lambda: pools_asked.append(1) or ["pool"])
    assert log == ["evict 7", "prefetch ['/a/1', '/a/2']", "get /a/1", "write /a/1 -> [1]",
                   "resident 1", "get /a/2", "write /a/2 -> [3]", "resident 2",
                   "prefetch ['/a/9']"]
    assert pools_asked == [1] and mgr.resident[2] == ("layout /a/2", (3,))
    assert waits.snapshot()["host_load_waits"] == 2
    # copies on the current stream are done: their leases go back first thing next step
    apply_commands(StepCommands(), mgr, copies, lambda: pytest.fail("no loads, no pools"))
    assert log[-2:] == ["release /a/1", "release /a/2"]


def test_a_failed_load_is_reported_and_registered_with_no_rows():
    log: list[str] = []
    failures = LoadFailures()
    copies = copies_of(Store(log, bad={"/a/1"}), log, failures=failures)
    mgr = Manager(log)
    apply_commands(StepCommands(load=(load(1, (4, 5)), load(2))), mgr, copies, lambda: [])
    assert "get /a/2" in log and "resident 1" in log and "resident 2" in log
    no_rows, blocks = mgr.resident[1]
    assert (no_rows.page_elems, no_rows.num_pages, no_rows.modules, blocks) == (
        PAGE, 2, {}, (4, 5))
    taken = failures.take()
    assert list(taken) == [1] and "truncated" in taken[1]


def test_a_full_host_cache_drains_this_steps_copies_and_retries_once():
    log: list[str] = []
    store = Store(log)
    failures = LoadFailures()
    copies = copies_of(store, log, failures=failures)
    fill = ["/a/2"]  # the cache is full of this step's lease of /a/1 when /a/2 is read, once

    def get(path, real=store.get):
        if path in fill:
            fill.remove(path)
            store.full = 1
        return real(path)

    store.get = get
    apply_commands(StepCommands(load=(load(1), load(2))), Manager(log), copies, lambda: [])
    assert log[1:] == ["get /a/1", "write /a/1 -> [1]", "resident 1", "full /a/2",
                       "release /a/1", "get /a/2", "write /a/2 -> [1]", "resident 2"]
    assert failures.take() == {}
    store.full = 2  # still full after the drain: the load fails, the engine goes on
    apply_commands(StepCommands(load=(load(3),)), Manager(log), copies, lambda: [])
    assert log[-3:] == ["full /a/3", "full /a/3", "resident 3"]
    assert "every cached adapter is leased" in failures.take()[3]


def test_leases_over_half_the_host_cache_are_given_back_within_the_step():
    log: list[str] = []
    copies = copies_of(Store(log, nbytes=100, capacity=300), log)  # half: 150 bytes
    apply_commands(StepCommands(load=(load(1), load(2), load(3))), Manager(log), copies,
                   lambda: [])
    assert [e for e in log if e.startswith(("get", "release"))] == [
        "get /a/1", "get /a/2", "release /a/1", "release /a/2", "get /a/3"]


def test_leases_of_copies_still_running_are_kept():
    log: list[str] = []
    copies = copies_of(Store(log), log)
    copies._in_flight = [_InFlight(SimpleNamespace(query=lambda: False), _closing(log, "busy"), 1),
                         _InFlight(SimpleNamespace(query=lambda: True), _closing(log, "done"), 1)]
    copies.release_finished()
    assert log == ["release done"] and len(copies._in_flight) == 1


def test_a_wrong_block_count_gives_the_lease_back_and_raises():
    log: list[str] = []
    copies = copies_of(Store(log, pages=2), log)
    with pytest.raises(RuntimeError, match=r"'a1' \(/a/1\) needs 2 pages but the scheduler gave 1"):
        apply_commands(StepCommands(load=(load(1),)), Manager(log), copies, lambda: [])
    assert log[-1] == "release /a/1" and copies._in_flight == []


def test_before_the_kv_cache_exists_evictions_apply_loads_refuse_prefetches_wait():
    log: list[str] = []
    apply_commands(StepCommands(evict=(1,), prefetch=(("a", "/a/a"),)), Manager(log), None,
                   lambda: [])
    assert log == ["evict 1"]
    with pytest.raises(RuntimeError, match="before the KV cache was allocated"):
        apply_commands(StepCommands(load=(load(1),)), Manager(log), None, lambda: [])


def _closing(log, name):
    stack = ExitStack()
    stack.callback(log.append, f"release {name}")
    return stack


def test_compressed_loads_lease_their_cores_and_unserved_clusters_are_refused(tmp_path, tiny_dims):
    """The real host store and CPU page loader: a compressed adapter's cores (leased from the
    host cache like a plain adapter's raw form) land in its blocks of every layer, its slot is
    marked with its cluster's group; one whose bases the engine does not hold is reported and
    its lease given back."""
    import torch

    from slora_plugin.adapters.peft_format import write_random_adapter
    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.worker.page_loader import PageLoader

    src, root = tmp_path / "src", tmp_path / "root"
    for i, name in enumerate(("c1", "c2")):
        write_random_adapter(str(src / name), tiny_dims, 2, ["q_proj", "v_proj"], seed=i, dtype=torch.float32)
    compress_collection(str(src), str(root / "coll"), 4, dims=tiny_dims, dtype=torch.float32)
    log: list[str] = []
    mgr, failures = Manager(log), LoadFailures()
    layers, blocks = tiny_dims.num_hidden_layers, 6
    pools = [torch.full((blocks * PAGE,), float("nan")) for _ in range(layers)]
    with AdapterStore(tiny_dims, PAGE, torch.float32, adapter_dir=str(root), max_rank=8,
                      host_cache_bytes=1 << 20, loader_threads=1) as store:
        spec = store.spec("coll/c1")
        group = (spec.collection, spec.cluster)
        copies = AdapterCopies(store, PAGE, PageLoader("cpu", 1 << 16), None, "cpu", HostLoadWaits(),
                               failures, compressed_groups=frozenset({group}))
        ids = tuple(range(2, 2 + spec.num_pages))
        apply_commands(StepCommands(load=(LoadAdapter(5, "coll/c1", spec.path, ids),)), mgr, copies,
                       lambda: pools)
        with store.get("coll/c1") as lease:
            want = lease.raw
        for layer, pool in enumerate(pools):
            got = pool.view(blocks, PAGE)[list(ids)]
            assert torch.equal(got, want[layer])
        layout, block_ids = mgr.resident[5]
        assert layout is spec.layout and block_ids == ids and failures.take() == {}
        assert mgr.groups[5] == group
        assert store.stats()["loads"] == 1  # the load was the host cache's, leased, then given back
        copies.drain()
        assert store.stats()["leased"] == 0

        refusing = AdapterCopies(store, PAGE, PageLoader("cpu", 1 << 16), None, "cpu", HostLoadWaits(),
                                 failures, compressed_groups=frozenset())
        apply_commands(StepCommands(load=(LoadAdapter(6, "coll/c2", store.spec("coll/c2").path, ids),)),
                       mgr, refusing, lambda: pools)
        assert "did not load at start" in failures.take()[6]
        assert store.stats()["leased"] == 0
