"""The worker's side of a step's `StepCommands`: evict, then load, then start host prefetches.

A load leases the adapter's raw pinned copy from the host store (`AdapterStore.get`, which
waits for the disk when the copy is not in pinned memory yet: `HostLoadWaits` counts those),
and writes its pages at the scheduler's block ids (`page_loader.PageLoader`) on a copy stream
that first waits for the compute stream (async scheduling may still run the previous step);
the compute stream waits for the loads before this step's forward. The lease is held until
the copy is seen done (pinned pages may then be reused), with two bounds that keep one step
from waiting on itself (`AdapterCopies`). A load that fails is reported to the scheduler
(`worker_link.LoadFailures`), not raised: the engine keeps serving the other adapters.

An adapter of a compressed collection (`adapters/compressed.py`) is leased the same way (its
host form is its cores, already in page form, read and prefetched by the host cache's loader
threads like a plain adapter's) and its cores are copied as they are into its blocks
(`PageLoader.load_cores`); the manager then points its slot at them with the key of its
cluster's resident bases.

No vLLM import: the LoRA manager is anything with `evict(lora_id)` and
`mark_resident(lora_id, layout, block_ids, group)` (`lora_manager.SLoRAModelManager` in the
engine).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, Sequence

import torch

from slora_plugin.adapters.compressed import CompressedSpec
from slora_plugin.adapters.errors import AdapterError, HostCacheFullError
from slora_plugin.adapters.host_cache import Lease
from slora_plugin.adapters.store import AdapterStore
from slora_plugin.core_layout import CoreLayout
from slora_plugin.layout import PageLayout
from slora_plugin.pool.commands import LoadAdapter, StepCommands
from slora_plugin.pool.worker_link import HostLoadWaits, LoadFailures
from slora_plugin.worker.page_loader import PageLoader

logger = logging.getLogger("vllm.slora.worker")  # the worker's logger (vllm.logger.init_logger)

#: Seconds a host read waits for room while every cached adapter is leased. Here the leases
#: are this worker's own in-flight copies, released only by this thread: waiting longer cannot
#: help, and `AdapterCopies._lease` answers the resulting HostCacheFullError by waiting for its
#: copies and releasing them (after which the whole cache is evictable). Fragmentation of the
#: arena by leases can reach that state below the `_bound_leased_bytes` bound.
HOST_ROOM_WAIT_S = 1.0


class AdapterPages(Protocol):
    """The worker's LoRA manager as the loads see it."""

    def evict(self, lora_id: int) -> None: ...

    def mark_resident(self, lora_id: int, layout: PageLayout | CoreLayout,
                      block_ids: tuple[int, ...], group: Hashable | None = None) -> None: ...


@dataclass
class _InFlight:
    event: torch.cuda.Event | None
    lease: ExitStack
    nbytes: int


class AdapterCopies:
    """One worker's adapter loads into its KV pages and the host leases they hold.

    `copy_stream` None: copies run on the current stream (CPU, tests) and are done when issued.
    `compressed_groups`: the (collection, cluster) keys whose bases the engine holds resident
    (`compressed_bases.directory_bases`); a compressed adapter of another cluster is refused.
    """

    def __init__(self, store: AdapterStore, page_elems: int, page_loader: PageLoader,
                 copy_stream: torch.cuda.Stream | None, device: torch.device | str,
                 host_waits: HostLoadWaits, failures: LoadFailures, *,
                 compressed_groups: frozenset[Hashable] = frozenset()) -> None:
        self.store = store
        self.compressed_groups = compressed_groups
        self.page_elems = page_elems
        self._page_loader = page_loader
        self._copy_stream = copy_stream
        self._device = device
        self._host_waits = host_waits
        self._failures = failures
        self._in_flight: list[_InFlight] = []

    def load(self, loads: Sequence[LoadAdapter], manager: AdapterPages,
             pools: Callable[[], list[torch.Tensor]]) -> None:
        """Load `loads` into the pages of every layer (`pools()`: one flat pool per decoder
        layer), ordered after the compute stream's work so far and before its next."""
        # Every host copy this step needs starts reading now, before the first load waits:
        # the loader threads read them side by side, not one after another (H100, 1,000
        # adapters at once: 653 blocking loads, 15.5 s, when each waited in turn).
        self.store.prefetch([load.path for load in loads])
        layer_pools = pools()
        compute = torch.cuda.current_stream(self._device) if self._copy_stream else None
        if self._copy_stream is not None:
            # the previous (async) step may still read or write these blocks
            self._copy_stream.wait_stream(compute)
        for load in loads:
            self._load(load, manager, layer_pools)
        if self._copy_stream is not None:
            compute.wait_stream(self._copy_stream)

    def _load(self, load: LoadAdapter, manager: AdapterPages, pools: list[torch.Tensor]) -> None:
        try:
            lease = self._lease(load)
            if isinstance(lease.spec, CompressedSpec):
                try:
                    check_served(lease.spec, self.compressed_groups)
                except AdapterError:
                    lease.release()
                    raise
        except AdapterError as e:
            # Admitted, but its weights cannot be read (e.g. truncated after the config check)
            # or it cannot fit the host cache: the engine must keep serving the others. It is
            # registered with no rows (rank 0: the kernels read nothing of its pages) for the
            # step that may run before the scheduler fails its requests with this reason.
            logger.error("adapter %r (%s) could not be loaded: %s", load.name, load.path, e)
            self._failures.add(load.lora_id, str(e))
            no_rows = PageLayout(self.page_elems, len(load.block_ids), {}, 0)
            manager.mark_resident(load.lora_id, no_rows, tuple(load.block_ids))
            return
        lease_stack = ExitStack()
        lease_stack.enter_context(lease)
        self._host_waits.record(lease.waited_s)
        spec = lease.spec
        try:
            _check_pages(load, spec.num_pages)
            event = None
            with self._on_copy_stream():
                if isinstance(spec, CompressedSpec):
                    self._page_loader.load_cores(pools, lease.raw, load.block_ids)
                else:
                    self._page_loader.load(pools, lease.raw, spec.layout, load.block_ids)
                if self._copy_stream is not None:
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
        except BaseException:
            lease_stack.close()
            raise
        self._in_flight.append(_InFlight(event, lease_stack, lease.nbytes))
        group = (spec.collection, spec.cluster) if isinstance(spec, CompressedSpec) else None
        manager.mark_resident(load.lora_id, spec.layout, tuple(load.block_ids), group)
        self._bound_leased_bytes()

    def _on_copy_stream(self) -> AbstractContextManager:
        """Issue on the copy stream (CUDA), or on the current one when there is none."""
        return torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()

    def _bound_leased_bytes(self) -> None:
        """Keep the host bytes this step's copies hold under half the host cache (the other
        half is what `AdapterStore.prefetch` may fill): past it, wait for the copies and give
        their leases back. Otherwise a step loading more than the cache holds leaves the next
        read nothing to evict but this step's own leases, and it waits for a release that
        only this thread could make (seen on the H100 with 2,000 adapters: ~60 s stalls)."""
        if sum(f.nbytes for f in self._in_flight) > self.store.step_share_bytes:
            self.drain()

    def _lease(self, load: LoadAdapter) -> Lease:
        """The adapter's host lease. When one step admits more adapters than the host cache
        holds at once, the leases of this step's earlier copies are what fills it: wait for
        those copies, give their leases back and try once more."""
        try:
            return self.store.get(load.path)
        except HostCacheFullError:
            self.drain()
            return self.store.get(load.path)

    def drain(self) -> None:
        """Wait for every copy issued so far and give back all their host leases (also at the
        worker's shutdown)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self.release_finished()

    def release_finished(self) -> None:
        """Give back host leases whose copies have completed (pinned pages may then be reused)."""
        still = []
        for f in self._in_flight:
            if f.event is None or f.event.query():
                f.lease.close()
            else:
                still.append(f)
        self._in_flight = still


def _check_pages(load: LoadAdapter, num_pages: int) -> None:
    if num_pages != len(load.block_ids):
        raise RuntimeError(f"adapter {load.name!r} ({load.path}) needs {num_pages} pages but the "
                           f"scheduler gave {len(load.block_ids)} blocks")


def check_served(spec: CompressedSpec, groups: frozenset[Hashable]) -> None:
    """AdapterError unless the bases of `spec`'s cluster are resident (collections are read
    at engine start; one added since is refused alone, the engine keeps serving)."""
    if (spec.collection, spec.cluster) not in groups:
        raise AdapterError(spec.name, spec.bases_file,
                           "belongs to a compressed collection whose bases this engine did not "
                           "load at start (it serves the collections present in the adapter "
                           "directory then): restart the engine to serve it")


def apply_commands(commands: StepCommands, manager: AdapterPages, copies: AdapterCopies | None,
                   pools: Callable[[], list[torch.Tensor]]) -> None:
    """Evict, then load (ordered against compute), then start host prefetches; first give back
    the host leases of finished copies (every step, even with no commands). `copies` is None
    until the KV cache and the host store exist (then no load may arrive)."""
    if copies is not None:
        copies.release_finished()
    for lora_id in commands.evict:
        manager.evict(lora_id)
    if commands.load:
        if copies is None:
            raise RuntimeError("an adapter load arrived before the KV cache was allocated")
        copies.load(commands.load, manager, pools)
    if commands.prefetch and copies is not None:
        copies.store.prefetch([path for _name, path in commands.prefetch])
