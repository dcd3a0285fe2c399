"""PagePool on its own, over a fake block allocator: LRU, all-or-nothing admission, commands."""

from __future__ import annotations

import pytest

from slora_plugin.pool.page_pool import AdapterNeed, PagePool, WaitForDrain


class FakeAllocator:
    """A free list of block ids 1..n (0 is vLLM's null block), first-freed reused first."""

    def __init__(self, n: int) -> None:
        self.free_ids = list(range(1, n + 1))

    def allocate(self, n):
        assert n <= len(self.free_ids), "pool over-allocated"
        out, self.free_ids = self.free_ids[:n], self.free_ids[n:]
        return out

    def free(self, ids):
        assert not set(ids) & set(self.free_ids), "double free"
        self.free_ids = list(ids) + self.free_ids

    def reclaim(self, ids):
        assert set(ids) <= set(self.free_ids), "reclaiming blocks that are not free"
        self.free_ids = [i for i in self.free_ids if i not in set(ids)]

    def num_free(self):
        return len(self.free_ids)


def need(i, pages=2, content="v1"):
    return AdapterNeed(lora_id=i, name=f"a{i}", path=f"/a/{i}", num_pages=pages, content_id=content)


class KV:
    """A stand-in for vLLM's allocate_slots: takes `blocks` blocks if they fit besides hold_back."""

    def __init__(self, alloc: FakeAllocator) -> None:
        self.alloc = alloc
        self.held: list[list[int]] = []

    def attempt(self, blocks):
        def run(hold_back=0):
            if blocks + hold_back > self.alloc.num_free():
                return None
            self.held.append(self.alloc.allocate(blocks))
            return self.held[-1]
        return run


def pool_of(blocks):
    """A PagePool over `blocks` fake blocks, with its allocator and a KV stand-in on the same blocks."""
    alloc = FakeAllocator(blocks)
    return alloc, PagePool(alloc), KV(alloc)


def admit_idle(pool, kv, lora_id, pages):
    """Load adapter `lora_id` (no KV blocks) and release it: resident and idle."""
    pool.admit(need(lora_id, pages), kv.attempt(0))
    pool.release(lora_id)


def test_admit_loads_once_and_counts_references():
    alloc, pool, kv = pool_of(10)
    assert pool.admit(need(1, 3), kv.attempt(2)) is not None
    assert pool.admit(need(1, 3), kv.attempt(2)) is not None
    assert pool.loads == 1 and pool.resident(1).refs == 2 and pool.adapter_pages == 3
    cmds = pool.take_commands()
    assert [(l.lora_id, len(l.block_ids)) for l in cmds.load] == [(1, 3)] and not cmds.evict
    pool.release(1)
    pool.release(1)
    assert pool.num_idle == 1 and pool.num_resident == 1  # idle adapters stay resident
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(1)


def test_idle_adapters_are_evicted_least_recently_used_first():
    alloc, pool, kv = pool_of(9)
    for i in (1, 2, 3):
        pool.admit(need(i, 2), kv.attempt(0))
    pool.take_commands()
    for i in (2, 1, 3):  # idle order: 2, 1, 3
        pool.release(i)
    assert pool.admit(None, kv.attempt(alloc.num_free() + 3)) is not None
    assert pool.held_blocks().keys() == {3}
    assert pool.take_commands().evict == (1, 2)


def test_failed_admission_undoes_its_evictions():
    alloc, pool, kv = pool_of(8)
    for i in (1, 2):
        admit_idle(pool, kv, i, 3)
    pool.take_commands()
    before = (pool.held_blocks(), sorted(alloc.free_ids), pool.evictions)
    assert pool.admit(need(3, 2), kv.attempt(7)) is None  # 7 + 2 > 8 even with both evicted
    assert (pool.held_blocks(), sorted(alloc.free_ids), pool.evictions) == before
    assert [r["lora_id"] for r in pool.residency()] == [1, 2]  # LRU order kept
    assert not pool.take_commands()


def test_the_requests_own_idle_adapter_is_never_evicted_for_it():
    alloc, pool, kv = pool_of(6)
    admit_idle(pool, kv, 1, 3)
    assert pool.admit(need(1, 3), kv.attempt(4)) is None  # would fit only by evicting itself
    assert pool.admit(need(1, 3), kv.attempt(3)) is not None
    assert pool.loads == 1 and pool.evictions == 0


def test_grow_evicts_idle_then_gives_up():
    alloc, pool, kv = pool_of(6)
    pool.admit(need(1, 2), kv.attempt(0))
    pool.admit(need(2, 2), kv.attempt(0))
    pool.release(1)
    assert pool.grow(lambda: kv.attempt(3)()) is not None  # 2 free + 2 from idle adapter 1
    assert pool.held_blocks().keys() == {2}
    assert pool.grow(lambda: kv.attempt(2)()) is None  # adapter 2 is in use: vLLM preempts
    assert pool.held_blocks().keys() == {2}


def test_load_and_evict_in_one_step_never_reach_the_workers():
    alloc, pool, kv = pool_of(4)
    admit_idle(pool, kv, 1, 2)
    pool.admit(None, kv.attempt(4))  # evicts adapter 1 before its load was sent
    assert not pool.take_commands()


def test_evict_and_reload_in_one_step_sends_both():
    alloc, pool, kv = pool_of(4)
    admit_idle(pool, kv, 1, 2)
    pool.take_commands()
    pool.evict_idle()
    pool.admit(need(1, 2), kv.attempt(0))
    cmds = pool.take_commands()
    assert cmds.evict == (1,) and [l.lora_id for l in cmds.load] == [1]


def test_changed_content_reloads_when_idle_and_waits_while_used():
    alloc, pool, kv = pool_of(8)
    pool.admit(need(1, 2, "old"), kv.attempt(0))
    with pytest.raises(WaitForDrain):
        pool.admit(need(1, 2, "new"), kv.attempt(0))
    pool.release(1)
    pool.take_commands()
    pool.admit(need(1, 2, "new"), kv.attempt(0))
    assert pool.resident(1).need.content_id == "new"
    cmds = pool.take_commands()
    assert cmds.evict == (1,) and len(cmds.load) == 1


def test_prefetch_hints_each_adapter_once_until_loaded():
    alloc, pool, kv = pool_of(8)
    pool.admit(need(1, 2), kv.attempt(0))
    queued = [(1, "a1", "/a/1"), (2, "a2", "/a/2"), (2, "a2", "/a/2"), (3, "a3", "/a/3"),
              (4, "a4", "/a/4")]
    assert pool.prefetch_hints(iter(queued), depth=2, scan_limit=10) == (("a2", "/a/2"), ("a3", "/a/3"))
    assert pool.prefetch_hints(iter(queued), depth=2, scan_limit=10) == (("a4", "/a/4"),)
    assert pool.prefetch_hints(iter(queued), depth=2, scan_limit=3) == ()
    assert pool.prefetch_hints(iter(queued), depth=0, scan_limit=10) == ()


def test_a_broken_load_gives_the_pages_back_on_the_last_release_and_reloads_afresh():
    alloc, pool, kv = pool_of(8)
    pool.admit(need(1, 2), kv.attempt(0))
    pool.admit(need(1, 2), kv.attempt(0))
    pool.take_commands()
    pool.mark_broken(1)  # the workers could not write its pages; two requests still hold it
    with pytest.raises(WaitForDrain, match="failed to load"):
        pool.admit(need(1, 2), kv.attempt(0))
    pool.release(1)
    assert pool.resident(1) is not None
    pool.release(1)
    assert pool.resident(1) is None and pool.adapter_pages == 0 and alloc.num_free() == 8
    assert pool.take_commands().evict == (1,)
    pool.admit(need(1, 2), kv.attempt(0))
    assert [l.lora_id for l in pool.take_commands().load] == [1]
    pool.release(1)
    pool.mark_broken(1)  # idle: evicted at once
    assert pool.resident(1) is None and pool.take_commands().evict == (1,)
