"""`AdapterStore`: the host adapter store's one entry point (names -> specs -> raw pinned adapters).

Who uses what:
  - the scheduler: `spec(name).num_pages` (config only, cheap, cached);
  - the worker: `get(name)` -> a `Lease` whose `.raw` (a `RawAdapter`: pinned buffer + layout,
    see raw_format.py; for a compressed adapter its cores in page form) it copies to the GPU,
    which writes the adapter's KV blocks from it; it releases the lease once the copy is done;
    `prefetch(names)` for queued requests;
  - the scheduler, when it shares the worker's process (`pool/worker_link.py`): `ready(name)`
    and `start(name)`, the readiness oracle of admission (`pool/admission.py`), cheap enough for
    every waiting request of every step.
An adapter of a compressed collection (`<collection>/<adapter>`, `adapters/compressed.py`) has a
`CompressedSpec` (its `num_pages` places its cores) and goes through the same host cache,
prefetch and readiness as a plain one (its host form is its cores: a few pages; its cluster's
bases are the worker's, resident on the device from the engine's start).
A name is directory-relative (`org/name`), else a Hugging Face Hub id found in the local HF
cache; an absolute path to an adapter directory (what `LoRARequest.lora_path` carries) is
accepted too. Errors are `AdapterError`s, remembered until the files change.
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence

import torch

from slora_plugin.adapters.compressed import (
    CompressedSpec, build_compressed_spec, compressed_key, split_path)
from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.host_cache import AnySpec, HostCache, Lease, host_bytes
from slora_plugin.adapters.sources import AdapterSources
from slora_plugin.adapters.spec import AdapterSpec, build_spec, files_key
from slora_plugin.adapters.targets import check_wrapped, check_wrapped_modules, wrapped_modules
from slora_plugin.compress.collection import MANIFEST
from slora_plugin.layout import ModelDims

__all__ = ["AdapterStore", "AdapterSpec", "AnySpec", "CompressedSpec", "AdapterError",
           "AdapterNotFoundError", "Lease"]


class AdapterStore:
    """Validated, pinned adapters (raw form) for one model, page size and serving dtype."""

    def __init__(self, dims: ModelDims, page_elems: int, dtype: torch.dtype, *,
                 adapter_dir: str | None, max_rank: int, host_cache_bytes: int, loader_threads: int,
                 hf_cache_dir: str | None = None, hub_download: bool = False,
                 wait_timeout_s: float = 60.0,
                 lora_target_modules: Sequence[str] | None = None) -> None:
        """`lora_target_modules`: the engine's `LoRAConfig.target_modules` (None: every module
        has LoRA layers); an adapter targeting a module without them is refused by `spec`."""
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"serving dtype {dtype} is not supported (float16, bfloat16, float32)")
        self.dims, self.page_elems, self.dtype, self.max_rank = dims, page_elems, dtype, max_rank
        self.wrapped = wrapped_modules(lora_target_modules)
        self.sources = AdapterSources(adapter_dir, hf_cache_dir, hub_download)
        self.index = self.sources.index
        self.cache = HostCache(dims, dtype, host_cache_bytes, loader_threads, wait_timeout_s)
        self._specs: dict[str, tuple[tuple, AnySpec | AdapterError]] = {}
        self._located: dict[str, str] = {}  # name or path asked for -> real directory path
        self._unloadable: set[str] = set()  # names whose spec failed in start()
        self._lock = threading.Lock()

    # ---- names --------------------------------------------------------------------------------
    def locate(self, name_or_path: str) -> tuple[str, str]:
        """(name, real directory path) of an adapter; AdapterNotFoundError if absent."""
        return self.sources.locate(name_or_path)

    def lora_int_id(self, name: str) -> int:
        """The stable integer id of a name (persisted next to the adapters when writable)."""
        return self.sources.lora_int_id(name)

    # ---- specs --------------------------------------------------------------------------------
    def spec(self, name_or_path: str) -> AnySpec:
        """Config-level validation (no weights read), including that every module the adapter
        targets has LoRA layers in this engine; cached until either file changes. For an
        adapter of a compressed collection: its `CompressedSpec` (manifest level)."""
        name, path = self.locate(name_or_path)
        key: tuple = files_key(path)
        member = split_path(path) if key[0] is None else None  # no config: a collection's?
        if member is not None:
            key = compressed_key(*member)
        with self._lock:
            cached = self._specs.get(path)
        if cached is None or cached[0] != key:
            try:
                if member is None:
                    result: AnySpec | AdapterError = build_spec(
                        name, path, key, self.dims, self.page_elems, self.max_rank)
                    check_wrapped(result, self.wrapped)
                else:
                    result = build_compressed_spec(name, path, *member, self.dims, self.page_elems)
                    check_wrapped_modules(name, result.modules, self.wrapped, MANIFEST)
            except AdapterError as e:
                result = e
            cached = (key, result)
            with self._lock:
                self._specs[path] = cached
        result = cached[1]
        if isinstance(result, AdapterError):
            raise type(result)(result.adapter, result.file, result.reason)
        with self._lock:
            self._located[name_or_path] = path
            self._unloadable.discard(name_or_path)
        return result

    # ---- raw adapters -------------------------------------------------------------------------
    def get(self, name_or_path: str) -> Lease:
        """The adapter's pinned host form (loaded once, however many callers); release the
        lease (or use `with`) once it is copied to the GPU."""
        return self.cache.get(self.spec(name_or_path))

    @property
    def step_share_bytes(self) -> int:
        """Half the host cache: what one call of `prefetch` may start reading, and what the
        worker lets one step's in-flight copies hold in leases, so that together they fit."""
        return self.cache.arena.capacity // 2

    def prefetch(self, names: Iterable[str]) -> None:
        """Start loading each adapter in the background, in order, while the ones not cached
        yet fit in half the host cache (more would only evict the first ones, or make the
        loader threads wait for room that this caller's own leases hold); one larger than
        half the cache on its own is skipped (its `get` reads it). Returns before any weights
        are read; a bad or missing adapter is skipped here (its error is remembered for
        `get`)."""
        half = room = self.step_share_bytes
        for name in names:
            try:
                spec = self.spec(name)
            except AdapterError:
                continue
            if not self.cache.path_busy(spec.path):
                need = host_bytes(spec, self.dims, self.dtype)
                if need > half:
                    continue
                if need > room:
                    return
                room -= need
            self.cache.prefetch(spec)

    # ---- readiness (pool.admission.HostReadiness) ---------------------------------------------
    def ready(self, name_or_path: str) -> bool:
        """Whether `get(name_or_path)` would return (or raise) without waiting for the disk.
        No file-system access: the name is mapped to its directory as the last `spec()` found
        it; a name never specified here is not ready (`start` specifies it)."""
        with self._lock:
            if name_or_path in self._unloadable:
                return True  # get raises at once; the scheduler fails the request
            path = self._located.get(name_or_path)
        return path is not None and self.cache.path_ready(path)

    def error(self, name_or_path: str) -> str | None:
        """Why the adapter cannot be loaded, if that is already known without the disk: its
        spec failed in `start`, or its host load failed (e.g. truncated weights). The scheduler
        fails the adapter's requests with this message instead of admitting them."""
        with self._lock:
            path = self._located.get(name_or_path)
            unloadable = name_or_path in self._unloadable
        if unloadable:
            try:
                self.spec(name_or_path)
            except AdapterError as e:
                return str(e)
            return None  # the files changed and are fine now
        err = self.cache.path_error(path) if path is not None else None
        return None if err is None else str(err)

    def start(self, name_or_path: str) -> None:
        """Start the host load of `name_or_path` now, unless it is cached, loading or known
        bad. Cheap when it is (no file-system access), so it may be called every step."""
        with self._lock:
            path = self._located.get(name_or_path)
        if path is not None and self.cache.path_busy(path):
            return
        try:
            spec = self.spec(name_or_path)
        except AdapterError:
            with self._lock:
                self._unloadable.add(name_or_path)
            return
        self.cache.prefetch(spec)

    def stats(self) -> dict[str, float | int]:
        s = self.cache.stats()
        with self._lock:
            s["specs_cached"] = len(self._specs)
            s["specs_bad"] = sum(1 for _, r in self._specs.values() if isinstance(r, AdapterError))
        return s

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> "AdapterStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
