"""Adapters' host forms in one pinned host buffer: LRU under a byte budget, loaded by a thread pool.

The worker copies an adapter to the GPU from here, so the bytes must be pinned (for an
asynchronous, full-speed DMA). A plain adapter is held in its raw form
(`slora_plugin/raw_format.py`: one record per layer, A and B as the file has them) -- a plain copy
of the file, so loading is memcpy-bound; the GPU writes the pages from it. An adapter of a
compressed collection is held as its cores already in page form (`compressed.read_cores`). One
buffer is pinned once (see `arena.py`); each adapter gets one contiguous block of it.

Rules that keep a busy server healthy:
  - concurrent requests for one adapter share one load (the others wait for it);
  - `get()` returns a `Lease` that pins the entry until released: an adapter being copied to
    the GPU is never evicted (eviction skips leased entries; a load that finds every byte
    leased waits for a release);
  - a bad adapter's error is remembered under its content key, so asking again fails at once
    and never touches the disk, while a fixed file (new size/mtime) gets a fresh load.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from slora_plugin.adapters.arena import Arena
from slora_plugin.adapters.compressed import CompressedSpec, core_bytes, read_cores
from slora_plugin.adapters.errors import AdapterError, HostCacheFullError
from slora_plugin.adapters.loader import read_raw
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.layout import ModelDims
from slora_plugin.raw_format import RawAdapter, raw_layout

Key = tuple[str, str]  # (real path, content_id)
AnySpec = AdapterSpec | CompressedSpec
#: What a lease holds: a plain adapter's raw form, or a compressed adapter's cores
#: ((num_layers, num_pages, page_elems), serving dtype).
HostForm = RawAdapter | torch.Tensor


@dataclass(eq=False)
class _Entry:
    key: Key
    spec: AnySpec
    offset: int
    nbytes: int
    raw: HostForm
    refs: int = 0


class Lease:
    """An adapter's host form pinned in the host cache until `release()` (or the end of `with`)."""

    def __init__(self, cache: "HostCache", entry: _Entry, waited_s: float = 0.0) -> None:
        self._cache, self._entry = cache, entry
        self.spec: AnySpec = entry.spec
        #: The adapter's host form (pinned when CUDA is there): a `RawAdapter` (buffer and
        #: layout) for an `AdapterSpec`, the cores tensor for a `CompressedSpec`.
        self.raw: HostForm = entry.raw
        #: Host bytes the lease holds.
        self.nbytes: int = entry.nbytes
        #: Seconds `get()` blocked for a load to finish; 0.0 when the copy was already cached.
        #: (The worker's step blocks this long: it is what admission by readiness avoids.)
        self.waited_s = waited_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._release(self._entry)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def host_bytes(spec: AnySpec, dims: ModelDims, dtype: torch.dtype) -> int:
    """Host bytes of an adapter's host form."""
    if isinstance(spec, CompressedSpec):
        return core_bytes(spec, dtype)
    return raw_layout(spec.layout, dims.num_hidden_layers, dtype).nbytes


def cores_per_load(loader_threads: int) -> int:
    """CPU cores one load may use: the machine's cores shared by the loader threads."""
    return max(1, (os.cpu_count() or 1) // max(1, loader_threads))


def _limit_intra_op_threads(n: int) -> None:
    """Each loader thread runs its torch ops (the finite check's reductions, conversions) on
    its share of the cores. Left alone, torch's OpenMP starts a team of all cores per loader
    thread, and a few loader threads oversubscribe the CPU many times over: that is why loads
    did not scale with threads. (This sets OpenMP's count for the calling thread and torch's
    default for threads started later; threads that already ran a parallel torch op, like the
    engine's main thread, keep theirs.)"""
    torch.set_num_threads(n)


class HostCache:
    """The pinned arena, its LRU index and the loader threads."""

    def __init__(self, dims: ModelDims, dtype: torch.dtype, capacity_bytes: int, loader_threads: int,
                 wait_timeout_s: float = 60.0) -> None:
        self.dims, self.dtype = dims, dtype
        self.arena = Arena(capacity_bytes)
        self.pinned = torch.cuda.is_available()
        # One allocation for the whole budget; pinned only where there is a GPU to copy to.
        self.buffer = torch.empty(self.arena.capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self.wait_timeout_s = wait_timeout_s
        share = cores_per_load(loader_threads)
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="slora-load",
                                        initializer=_limit_intra_op_threads, initargs=(share,))
        # One load's file reads are split over `share` threads (preadv releases the GIL): a
        # single thread copies from the page cache at only ~4 GB/s on a server core.
        self._read_parts = share
        self._readers = ThreadPoolExecutor(max_workers=share * loader_threads,
                                           thread_name_prefix="slora-read") if share > 1 else None
        self._cv = threading.Condition()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # LRU first
        self._loading: dict[Key, Future] = {}
        self._failed: dict[Key, AdapterError] = {}
        # By path, for the scheduler's readiness checks (no file-system access, no content id):
        self._latest: dict[str, Key] = {}  # path -> key of its newest cached entry
        self._loading_paths: dict[str, int] = {}  # path -> loads in flight
        self._failed_paths: dict[str, Key] = {}  # path -> its remembered failure (one at most)
        self._closed = False
        self._counters = dict(hits=0, misses=0, joins=0, prefetches=0, evictions=0, load_errors=0,
                              loads=0, bytes_loaded=0, load_seconds_total=0.0, load_seconds_max=0.0)

    # ---- public -------------------------------------------------------------------------------
    def get(self, spec: AnySpec) -> Lease:
        """The adapter's host form, loading it (once, however many callers) if it is not cached."""
        key = (spec.path, spec.content_id)
        # A call counts once: as a hit, a miss (it started the load) or a join. It waited from
        # its first look if that found no entry (None: it has not waited).
        since: float | None = None
        while True:
            with self._cv:
                self._check_open()
                if key in self._failed:
                    raise self._failed[key]
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refs += 1
                    self._entries.move_to_end(key)
                    self._counters["hits"] += 0 if since is not None else 1
                    return Lease(self, entry, 0.0 if since is None else time.perf_counter() - since)
                future = self._loading.get(key)
                if future is None:
                    future = self._start(spec, key)
                    self._counters["misses"] += 0 if since is not None else 1
                elif since is None:
                    self._counters["joins"] += 1
                if since is None:
                    since = time.perf_counter()
            future.result()  # raises the load's error; on success, loop to lease the entry

    def prefetch(self, spec: AnySpec) -> None:
        """Start loading `spec` in the background unless it is cached, loading or known bad."""
        key = (spec.path, spec.content_id)
        with self._cv:
            self._check_open()
            if key in self._entries or key in self._loading or key in self._failed:
                return
            self._start(spec, key)
            self._counters["prefetches"] += 1

    def path_ready(self, path: str) -> bool:
        """Whether `get()` for the newest content of `path` seen here would return without
        waiting for the disk: its copy is cached (it then becomes the most recently used entry,
        so the loads started after this check evict it last) or its load failed (get raises at
        once). No file-system access; a file changed since its load is not noticed here (get
        then loads the new content, and waits)."""
        with self._cv:
            key = self._latest.get(path)
            if key is not None:
                self._entries.move_to_end(key)
                return True
            return path in self._failed_paths

    def path_error(self, path: str) -> AdapterError | None:
        """The error of the newest failed load of `path`, if its newest load failed."""
        with self._cv:
            key = self._failed_paths.get(path)
            return None if key is None else self._failed.get(key)

    def path_busy(self, path: str) -> bool:
        """Whether `path` is cached, loading, or known bad (a prefetch would do nothing)."""
        with self._cv:
            return (path in self._latest or path in self._loading_paths
                    or path in self._failed_paths)

    def failed(self, spec: AnySpec) -> AdapterError | None:
        with self._cv:
            return self._failed.get((spec.path, spec.content_id))

    def stats(self) -> dict[str, float | int]:
        with self._cv:
            s: dict[str, float | int] = dict(self._counters)
            s.update(entries=len(self._entries), loading=len(self._loading),
                     leased=sum(1 for e in self._entries.values() if e.refs),
                     known_bad=len(self._failed), bytes_used=self.arena.used_bytes,
                     capacity_bytes=self.arena.capacity, pinned=int(self.pinned))
            return s

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    # ---- internals ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the adapter host cache is closed")

    def _start(self, spec: AnySpec, key: Key) -> Future:
        future = self._pool.submit(self._load, spec, key)
        self._loading[key] = future
        self._loading_paths[key[0]] = self._loading_paths.get(key[0], 0) + 1
        return future

    def _done_loading(self, key: Key) -> None:
        if self._loading.pop(key, None) is None:
            return
        left = self._loading_paths[key[0]] - 1
        if left:
            self._loading_paths[key[0]] = left
        else:
            del self._loading_paths[key[0]]

    def _release(self, entry: _Entry) -> None:
        with self._cv:
            entry.refs -= 1
            self._cv.notify_all()

    def _load(self, spec: AnySpec, key: Key) -> None:
        t0 = time.perf_counter()
        nbytes = host_bytes(spec, self.dims, self.dtype)
        try:
            if Arena.rounded(nbytes) > self.arena.capacity:
                raise AdapterError(spec.name, None, f"needs {nbytes} host bytes, more than the whole "
                                                    f"host cache ({self.arena.capacity} bytes); raise "
                                                    f"slora.host_cache_bytes")
            with self._cv:
                offset = self._allocate(spec, nbytes)
            try:
                raw = self._read(spec, self.buffer[offset:offset + nbytes])
            except BaseException:
                with self._cv:
                    self.arena.free(offset)
                raise
        except BaseException as e:
            with self._cv:
                self._done_loading(key)
                if isinstance(e, AdapterError) and not isinstance(e, HostCacheFullError):
                    self._forget_path(spec.path)
                    self._failed[key] = e
                    self._failed_paths[spec.path] = key
                    self._counters["load_errors"] += 1
                self._cv.notify_all()
            raise
        dt = time.perf_counter() - t0
        with self._cv:
            self._forget_path(spec.path)  # older contents of the same directory are stale
            self._entries[key] = _Entry(key, spec, offset, nbytes, raw)
            self._latest[spec.path] = key
            self._done_loading(key)
            c = self._counters
            c["loads"] += 1
            c["bytes_loaded"] += nbytes
            c["load_seconds_total"] += dt
            c["load_seconds_max"] = max(c["load_seconds_max"], dt)
            self._cv.notify_all()

    def _read(self, spec: AnySpec, block: torch.Tensor) -> HostForm:
        """Fill `block` (uint8, `host_bytes(spec)` long, 4 KiB-aligned) with the adapter's host
        form, validated; AdapterError for anything wrong with its files."""
        if isinstance(spec, CompressedSpec):
            layout = spec.layout
            cores = block.view(self.dtype).view(spec.manifest.num_layers, layout.num_pages, layout.page_elems)
            return read_cores(spec, self.dtype, out=cores)
        raw = RawAdapter(block, raw_layout(spec.layout, self.dims.num_hidden_layers, self.dtype))
        read_raw(spec, self.dims, raw, self._readers, self._read_parts)
        return raw

    def _allocate(self, spec: AnySpec, nbytes: int) -> int:
        """A block of the arena, evicting least-recently-used unleased entries as needed; waits
        (bounded) while everything that could make room is leased. Called with the lock held."""
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            offset = self.arena.alloc(nbytes)
            if offset is not None:
                return offset
            victim = next((e for e in self._entries.values() if e.refs == 0), None)
            if victim is not None:
                self._evict(victim)
                continue
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                raise HostCacheFullError(
                    spec.name, None, f"the host cache has no room for {nbytes} bytes: every cached "
                                     f"adapter is leased ({self.arena.used_bytes} of "
                                     f"{self.arena.capacity} bytes); raise slora.host_cache_bytes")
            self._cv.wait(left)

    def _evict(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        if self._latest.get(entry.key[0]) == entry.key:
            del self._latest[entry.key[0]]
        self.arena.free(entry.offset)
        self._counters["evictions"] += 1

    def _forget_path(self, path: str) -> None:
        """Drop unleased entries and remembered errors of an older content of `path`."""
        for key in [k for k in self._failed if k[0] == path]:
            del self._failed[key]
        self._failed_paths.pop(path, None)
        for entry in [e for e in self._entries.values() if e.key[0] == path and e.refs == 0]:
            self._evict(entry)
