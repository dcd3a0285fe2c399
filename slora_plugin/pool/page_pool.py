"""Which adapters hold which KV blocks: the residency logic of the unified page pool.

An adapter's weights live in ordinary KV blocks taken from the same free list the scheduler's
KV cache uses (S-LoRA's unified paging). This module decides, over plain block ids:

- an adapter is *resident* from its load until its eviction, and holds exactly `num_pages`
  blocks all that time;
- requests hold *references* to resident adapters (taken at admission, dropped when vLLM frees
  the request's KV); an adapter with no reference is *idle* and stays resident, in LRU order,
  until memory is needed -- then idle adapters are evicted, least recently used first;
- admission is all-or-nothing: `admit` runs vLLM's own KV allocation while holding back the
  adapter's pages, evicting idle adapters between tries; if it still fails, every eviction it
  made is undone (the same blocks are taken back) so a request that cannot start costs the
  adapter cache nothing;
- growing a running request (`grow`) evicts idle adapters before giving up, so vLLM preempts a
  running request only when no idle adapter is left.

Every change is also logged per step and turned into the workers' `StepCommands` by
`take_commands`: evictions of adapters the workers have, loads of adapters resident now but
not loaded yet. An adapter loaded and evicted within one step never reaches the workers.

No vLLM import here: the block allocator is a protocol (the vLLM glue adapts `BlockPool`), so
the logic is tested directly against a fake allocator and through the real scheduler.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

from slora_plugin.pool.commands import LoadAdapter, StepCommands

T = TypeVar("T")


class BlockAllocator(Protocol):
    """The free list adapters share with the KV cache (vLLM's BlockPool, by block id)."""

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (the caller has checked they exist)."""

    def free(self, block_ids: Sequence[int]) -> None:
        """Give blocks back; they are reused first (they hold no cached prefix)."""

    def reclaim(self, block_ids: Sequence[int]) -> None:
        """Take back exactly these blocks, which are free (undo of `free`)."""

    def num_free(self) -> int: ...


@dataclass(frozen=True)
class AdapterNeed:
    """What admitting a request asks of the pool: this adapter, in `num_pages` blocks."""

    lora_id: int
    name: str
    path: str
    num_pages: int
    content_id: str


@dataclass
class Resident:
    need: AdapterNeed
    block_ids: tuple[int, ...]
    refs: int = 0
    #: True once a load command for these blocks has been handed to the workers.
    on_workers: bool = False


class WaitForDrain(Exception):
    """The adapter changed on disk while requests still run on the old copy: the request
    waits until they finish (one lora id cannot hold two copies on the workers)."""


class PagePool:
    def __init__(self, allocator: BlockAllocator) -> None:
        self._alloc = allocator
        self._entries: dict[int, Resident] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._step_evicted: set[int] = set()
        self._step_loaded: dict[int, None] = {}  # insertion-ordered set
        self._hinted: set[int] = set()
        #: adapters whose load failed on the workers while requests held them: evicted on
        #: their last release, never admitted onto meanwhile
        self._broken: set[int] = set()
        self.loads = 0
        self.evictions = 0
        #: pages held by resident adapters, kept up to date by _load/_evict/_restore (read
        #: every step for the pool statistics: no sum over thousands of adapters)
        self._adapter_pages = 0

    # ----------------------------------------------------------------- queries
    def resident(self, lora_id: int) -> Resident | None:
        return self._entries.get(lora_id)

    @property
    def adapter_pages(self) -> int:
        return self._adapter_pages

    @property
    def num_resident(self) -> int:
        return len(self._entries)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def idle_pages(self) -> int:
        return sum(len(self._entries[i].block_ids) for i in self._idle)

    def held_blocks(self) -> dict[int, tuple[int, ...]]:
        """lora id -> its block ids, in page order."""
        return {i: e.block_ids for i, e in self._entries.items()}

    def residency(self) -> list[dict]:
        """Per-adapter detail for operators, most recently used last."""
        order = [i for i in self._entries if i not in self._idle] + list(self._idle)
        return [{"lora_id": i, "name": e.need.name, "path": e.need.path,
                 "content_id": e.need.content_id, "pages": len(e.block_ids),
                 "requests": e.refs, "idle": e.refs == 0, "loaded_on_workers": e.on_workers}
                for i in order for e in (self._entries[i],)]

    # ------------------------------------------------------------- admission
    def admit(self, need: AdapterNeed | None, attempt: Callable[[int], T | None]) -> T | None:
        """Admit a request that uses adapter `need` (None: no adapter).

        `attempt(hold_back)` is vLLM's KV allocation for the request, made as if `hold_back`
        fewer blocks were free; it returns None, having changed nothing, when the request does
        not fit. On success the adapter is resident (loaded now if it was not) and the request
        holds a reference; on failure nothing changed. Raises WaitForDrain (see there).
        """
        if need is not None:
            self._drop_if_stale(need)
        entry = self._entries.get(need.lora_id) if need is not None else None
        hold_back = need.num_pages if need is not None and entry is None else 0
        protect = need.lora_id if entry is not None else None
        undo: list[Resident] = []
        while (result := attempt(hold_back)) is None:
            victim = self._lru_idle(exclude=protect)
            if victim is None:
                for entry in reversed(undo):
                    self._restore(entry)
                return None
            undo.append(self._evict(victim))
        if need is not None:
            if entry is None:
                entry = self._load(need)
            self._ref(entry)
        return result

    def grow(self, attempt: Callable[[], T | None]) -> T | None:
        """More KV for a running request: evict idle adapters (LRU first) until `attempt`
        succeeds; None (vLLM then preempts) only once no idle adapter is left."""
        while (result := attempt()) is None:
            victim = self._lru_idle()
            if victim is None:
                return None
            self._evict(victim)
        return result

    def release(self, lora_id: int) -> None:
        """A request holding `lora_id` is freed (finished, aborted or preempted)."""
        entry = self._entries[lora_id]
        if entry.refs <= 0:
            raise RuntimeError(f"adapter {entry.need.name!r} (lora id {lora_id}) released more "
                               f"often than acquired")
        entry.refs -= 1
        if entry.refs == 0:
            self._idle[lora_id] = None  # most recently used
            if lora_id in self._broken:
                self._broken.discard(lora_id)
                self._evict(lora_id)

    def mark_broken(self, lora_id: int) -> None:
        """The workers could not write the adapter into its pages (they registered it with no
        rows): give the pages back as soon as no request holds them, and admit nothing onto
        them meanwhile, so a later request loads the adapter afresh instead of silently
        running without its weights."""
        entry = self._entries.get(lora_id)
        if entry is None:
            return
        if entry.refs == 0:
            self._evict(lora_id)
        else:
            self._broken.add(lora_id)

    def evict_idle(self) -> int:
        """Evict every idle adapter (before a prefix-cache reset); returns how many."""
        n = 0
        while (victim := self._lru_idle()) is not None:
            self._evict(victim)
            n += 1
        return n

    # -------------------------------------------------------------- commands
    def prefetch_hints(self, adapters: Iterable[tuple[int, str, str]], depth: int,
                       scan_limit: int) -> tuple[tuple[str, str], ...]:
        """(name, path) of up to `depth` adapters of queued requests (`adapters` yields their
        (lora id, name, path) in queue order) that are neither resident nor hinted already;
        looks at no more than `scan_limit` requests."""
        hints: list[tuple[str, str]] = []
        if depth <= 0:
            return ()
        for n, (lora_id, name, path) in enumerate(adapters):
            if n >= scan_limit or len(hints) >= depth:
                break
            if lora_id in self._entries or lora_id in self._hinted:
                continue
            self._hinted.add(lora_id)
            hints.append((name, path))
        return tuple(hints)

    def take_commands(self, prefetch: tuple[tuple[str, str], ...] = ()) -> StepCommands:
        """What the workers must do before running the step being scheduled."""
        loads = []
        for lora_id in self._step_loaded:
            e = self._entries[lora_id]
            e.on_workers = True
            loads.append(LoadAdapter(lora_id=lora_id, name=e.need.name, path=e.need.path,
                                     block_ids=e.block_ids))
        commands = StepCommands(evict=tuple(sorted(self._step_evicted)), load=tuple(loads),
                                prefetch=prefetch)
        self._step_evicted.clear()
        self._step_loaded.clear()
        return commands

    # ------------------------------------------------------------- internals
    def _drop_if_stale(self, need: AdapterNeed) -> None:
        if need.lora_id in self._broken:
            raise WaitForDrain(f"adapter {need.name!r} failed to load; waiting for the requests "
                               f"that held it to finish before loading it again")
        entry = self._entries.get(need.lora_id)
        if entry is None or entry.need.content_id == need.content_id:
            return
        if entry.refs:
            raise WaitForDrain(f"adapter {need.name!r} changed on disk; waiting for "
                               f"{entry.refs} request(s) on the old copy to finish")
        self._evict(need.lora_id)

    def _lru_idle(self, exclude: int | None = None) -> int | None:
        for lora_id in self._idle:
            if lora_id != exclude:
                return lora_id
        return None

    def _load(self, need: AdapterNeed) -> Resident:
        entry = Resident(need, tuple(self._alloc.allocate(need.num_pages)) if need.num_pages else ())
        self._entries[need.lora_id] = entry
        self._adapter_pages += len(entry.block_ids)
        self._step_loaded[need.lora_id] = None
        self._hinted.discard(need.lora_id)
        self.loads += 1
        return entry

    def _ref(self, entry: Resident) -> None:
        entry.refs += 1
        self._idle.pop(entry.need.lora_id, None)

    def _evict(self, lora_id: int) -> Resident:
        entry = self._entries.pop(lora_id)
        self._adapter_pages -= len(entry.block_ids)
        assert entry.refs == 0, "only idle adapters are evicted"
        del self._idle[lora_id]
        if entry.on_workers:
            self._step_evicted.add(lora_id)
        else:
            del self._step_loaded[lora_id]
        if entry.block_ids:
            self._alloc.free(entry.block_ids)
        self.evictions += 1
        return entry

    def _restore(self, entry: Resident) -> None:
        """Undo `_evict` of an LRU-first adapter; called in reverse eviction order, so the
        restored adapters get back their places at the LRU end (only the protected adapter,
        which `admit` skipped over, may end up behind them)."""
        lora_id = entry.need.lora_id
        if entry.block_ids:
            self._alloc.reclaim(entry.block_ids)
        self._entries[lora_id] = entry
        self._adapter_pages += len(entry.block_ids)
        self._idle[lora_id] = None
        self._idle.move_to_end(lora_id, last=False)
        if entry.on_workers:
            self._step_evicted.discard(lora_id)
        else:
            self._step_loaded[lora_id] = None
        self.evictions -= 1
