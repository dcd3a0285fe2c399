"""`SLoRAWorker`: vLLM's GPU worker with adapters served from KV pages.

What it adds to `vllm.v1.worker.gpu_worker.Worker`:
  - first, in a child process, one torch CPU thread unless OMP_NUM_THREADS is set (`threads.py`:
    a forked engine core otherwise hangs on its first parallel CPU op if the parent used some);
  - at start, refuses configurations the unified pool does not support (clear message);
  - `init_device` / `initialize_from_config`: the runner captures one set of CUDA graphs (with
    LoRA) and replays it for every batch, with or without adapters (`patches/lora_cudagraph.py`);
  - `load_model`: the model runner (V1 or V2) builds the plugin's LoRA manager, so vLLM's linear
    LoRA layers compute through the paged kernels and no stacked adapter buffers exist;
  - `initialize_from_config`: after the KV cache exists, checks that one block id is one
    contiguous page of every layer, points each LoRA layer at its decoder layer's pool, and opens
    the host adapter store with that page size;
  - `execute_model`: applies the scheduler's commands (evict, then load, then host prefetch)
    before the step runs. The host copies of all the step's loads start reading at once;
    loads copy each raw pinned adapter to the GPU and write its pages there
    (`page_loader.py`) on a copy stream that first waits for the compute stream (async scheduling
    may still run the previous step), and the compute stream waits for the loads before this
    step's forward. A load whose host copy is not in pinned memory yet blocks the step until
    the disk read is done: `host_waits` counts the loads that did and the seconds they waited;
  - publishes its host store (readiness oracle) and `host_waits` for a scheduler in the same
    process (`pool/worker_link.py`), which then admits only requests whose adapter is ready;
  - `shutdown`: waits for its copies and closes the host store (joins its threads) before
    vLLM's own teardown.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_worker import Worker

from slora_plugin.config import engine_settings
from slora_plugin.adapters.errors import AdapterError, HostCacheFullError
from slora_plugin.layout import ModelDims, PageLayout
from slora_plugin.patches import kv_pool
from slora_plugin.patches import lora_cudagraph as graphs_patch
from slora_plugin.patches import lora_worker as worker_patch
from slora_plugin.pool.commands import LoadAdapter, StepCommands, commands_of
from slora_plugin.pool.worker_link import HostLoadWaits, WorkerLink, engine_key, publish
from slora_plugin.raw_format import record_bytes_bound
from slora_plugin.worker.lora_layers import layer_index
from slora_plugin.worker.lora_manager import SLoRAModelManager, SLoRAWorkerLoRAManager
from slora_plugin.worker.ops import pool_view
from slora_plugin.worker.page_loader import PageLoader
from slora_plugin.worker.threads import limit_child_torch_threads


logger = init_logger("vllm.slora.worker")


#: Seconds a host read waits for room while every cached adapter is leased. Here the leases
#: are this worker's own in-flight copies, released only by this thread: waiting longer cannot
#: help, and `_lease` answers the resulting HostCacheFullError by waiting for its copies and
#: releasing them (after which the whole cache is evictable). Fragmentation of the arena by
#: leases can reach that state below the `_bound_leased_bytes` bound.
HOST_ROOM_WAIT_S = 1.0


class SLoRAScopeError(ValueError):
    """The engine configuration is outside what the plugin supports."""


def scope_problems(vllm_config: Any) -> list[str]:
    """Everything in `vllm_config` the unified page pool cannot serve (empty: all fine)."""
    p = []
    par = vllm_config.parallel_config
    if par.tensor_parallel_size > 1:
        p.append(f"tensor_parallel_size={par.tensor_parallel_size} (only 1 is supported)")
    if par.pipeline_parallel_size > 1:
        p.append(f"pipeline_parallel_size={par.pipeline_parallel_size} (only 1 is supported)")
    if getattr(par, "decode_context_parallel_size", 1) > 1:
        p.append("decode context parallelism")
    if vllm_config.kv_transfer_config is not None:
        p.append("a KV connector (kv_transfer_config): adapter pages are not KV to transfer")
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        p.append("sleep mode: it would discard the adapter pages with the KV cache")
    lc = vllm_config.lora_config
    if lc is None:
        p.append("LoRA is not enabled (the plugin's engine-args hook should have enabled it)")
    elif lc.fully_sharded_loras:
        p.append("fully_sharded_loras")
    return p


def check_scope(vllm_config: Any) -> None:
    found = scope_problems(vllm_config)
    if found:
        raise SLoRAScopeError("slora-plugin cannot serve this configuration: " + "; ".join(found)
                              + ". Disable the plugin or change these settings.")


@dataclass
class _InFlight:
    event: torch.cuda.Event | None
    lease: ExitStack
    nbytes: int


class SLoRAWorker(Worker):
    """vLLM's worker, serving LoRA adapters from KV pages (see the module docstring)."""

    def __init__(self, vllm_config, local_rank: int, rank: int, distributed_init_method: str,
                 is_driver_worker: bool = False) -> None:
        limit_child_torch_threads()
        check_scope(vllm_config)
        self.slora_config = engine_settings(vllm_config)
        super().__init__(vllm_config=vllm_config, local_rank=local_rank, rank=rank,
                         distributed_init_method=distributed_init_method,
                         is_driver_worker=is_driver_worker)
        self.adapter_store = None
        self.page_elems = 0
        self._layer_pools: list[Any] = []  # decoder layer -> attention module (holds kv_cache)
        self._copy_stream: torch.cuda.Stream | None = None
        self._page_loader: PageLoader | None = None
        self._in_flight: list[_InFlight] = []
        #: Adapter loads by whether the step waited for the host copy (see worker_link).
        self.host_waits = HostLoadWaits()
        self._link: WorkerLink | None = None  # kept here: the registry holds it weakly

    # -- model ------------------------------------------------------------------------------
    def init_device(self) -> None:
        super().init_device()
        graphs_patch.capture_one_lora_case(self.model_runner, self.vllm_config.lora_config)

    def load_model(self, *args, **kwargs) -> None:
        with worker_patch.worker_lora_manager_class(SLoRAWorkerLoRAManager):
            super().load_model(*args, **kwargs)

    @property
    def slora_manager(self) -> SLoRAModelManager:
        manager = getattr(self.model_runner, "lora_manager", None)
        model_manager = getattr(manager, "model_manager", None)
        if not isinstance(model_manager, SLoRAModelManager):
            raise RuntimeError("the model runner did not build the slora LoRA manager "
                               f"(got {type(manager).__name__}); is vLLM 0.26.0 installed?")
        return model_manager

    # -- KV cache = page pool ---------------------------------------------------------------
    def initialize_from_config(self, kv_cache_config) -> None:
        page_size = kv_pool.check_kv_cache_config(kv_cache_config)
        super().initialize_from_config(kv_cache_config)
        graphs_patch.dispatch_to_lora_case(self.model_runner, self.vllm_config.lora_config)
        dtype = self.model_config.dtype
        itemsize = dtype.itemsize
        if page_size % itemsize:
            raise SLoRAScopeError(f"KV page of {page_size} bytes is not a whole number of "
                                  f"{dtype} elements")
        self.page_elems = page_size // itemsize
        attn = kv_pool.attention_layers(self.vllm_config, kv_cache_config)
        num_layers = len(attn)
        for module, _name in attn:
            kv_pool.check_blocks_first(module.kv_cache, kv_cache_config.num_blocks, page_size,
                                       _name)
        self._layer_pools = [m for m, _ in attn]
        mgr = self.slora_manager
        for key in mgr.modules:
            li = layer_index(key)
            if li >= num_layers:
                raise SLoRAScopeError(f"{key}: decoder layer {li} has no attention KV cache")
            mgr.runtime.bind_layer(key, lambda m=self._layer_pools[li]: m.kv_cache)
        self._open_store(num_layers, dtype)

    def _open_store(self, num_layers: int, dtype: torch.dtype) -> None:
        from slora_plugin.adapters.store import AdapterStore

        hf = self.model_config.hf_config
        hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        dims = ModelDims.from_hf_config(hf)
        if dims.num_hidden_layers != num_layers:
            raise SLoRAScopeError(f"the model has {dims.num_hidden_layers} decoder layers but "
                                  f"{num_layers} attention KV caches")
        c = self.slora_config
        self.adapter_store = AdapterStore(dims, self.page_elems, dtype,
                                          adapter_dir=c.adapter_dir, max_rank=c.max_lora_rank,
                                          host_cache_bytes=c.host_cache_bytes,
                                          loader_threads=c.loader_threads,
                                          wait_timeout_s=HOST_ROOM_WAIT_S,
                                          lora_target_modules=self.vllm_config.lora_config.target_modules)
        self._link = WorkerLink(readiness=self.adapter_store, waits=self.host_waits)
        key = engine_key(self.vllm_config)
        publish(key, self._link)
        logger.info("slora: host adapter store published to the scheduler (engine %s, pid %d)",
                    key, os.getpid())
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device=self.device)
        self._page_loader = PageLoader(self.device, record_bytes_bound(dims, c.max_lora_rank, dtype))

    def _pools(self) -> list[torch.Tensor]:
        dtype = self.model_config.dtype
        pools = [pool_view(m.kv_cache, dtype) for m in self._layer_pools]
        if any(p is None for p in pools):
            raise RuntimeError("an adapter load arrived before the KV cache was allocated")
        return pools  # type: ignore[return-value]

    # -- the scheduler's commands -----------------------------------------------------------
    def execute_model(self, scheduler_output):
        self.apply_commands(commands_of(scheduler_output))
        return super().execute_model(scheduler_output)

    def apply_commands(self, commands: StepCommands) -> None:
        """Evict, then load (ordered against compute), then start host prefetches; first give
        back the host leases of finished copies (every step, even with no commands)."""
        self._release_finished()
        mgr = self.slora_manager
        for lora_id in commands.evict:
            mgr.evict(lora_id)
        if commands.load:
            if self.adapter_store is None:
                raise RuntimeError("an adapter load arrived before the KV cache was allocated")
            # Every host copy this step needs starts reading now, before the first load waits:
            # the loader threads read them side by side, not one after another (H100, 1,000
            # adapters at once: 653 blocking loads, 15.5 s, when each waited in turn).
            self.adapter_store.prefetch([load.path for load in commands.load])
            pools = self._pools()
            compute = torch.cuda.current_stream(self.device) if self._copy_stream else None
            if self._copy_stream is not None:
                # the previous (async) step may still read or write these blocks
                self._copy_stream.wait_stream(compute)
            for load in commands.load:
                self._load(load, pools)
            if self._copy_stream is not None:
                compute.wait_stream(self._copy_stream)
        if commands.prefetch and self.adapter_store is not None:
            self.adapter_store.prefetch([path for _name, path in commands.prefetch])

    def _load(self, load: LoadAdapter, pools: list[torch.Tensor]) -> None:
        try:
            lease_cm = self._lease(load)
        except AdapterError as e:
            # Admitted, but its weights cannot be read (e.g. truncated after the config check)
            # or it cannot fit the host cache: the engine must keep serving the others. It is
            # registered with no rows (rank 0: the kernels read nothing of its pages) for the
            # step that may run before the scheduler fails its requests with this reason.
            logger.error("adapter %r (%s) could not be loaded: %s", load.name, load.path, e)
            self._link.failures.add(load.lora_id, str(e))
            no_rows = PageLayout(self.page_elems, len(load.block_ids), {}, 0)
            self.slora_manager.mark_resident(load.lora_id, no_rows, tuple(load.block_ids))
            return
        lease_stack = ExitStack()
        lease = lease_stack.enter_context(lease_cm)
        self.host_waits.record(lease.waited_s)
        try:
            if lease.spec.num_pages != len(load.block_ids):
                raise RuntimeError(
                    f"adapter {load.name!r} ({load.path}) needs {lease.spec.num_pages} pages but "
                    f"the scheduler gave {len(load.block_ids)} blocks")
            event = None
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    self._page_loader.load(pools, lease.raw, lease.spec.layout, load.block_ids)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
            else:
                self._page_loader.load(pools, lease.raw, lease.spec.layout, load.block_ids)
        except BaseException:
            lease_stack.close()
            raise
        self._in_flight.append(_InFlight(event, lease_stack, lease.raw.layout.nbytes))
        self.slora_manager.mark_resident(load.lora_id, lease.spec.layout, tuple(load.block_ids))
        self._bound_leased_bytes()

    def _bound_leased_bytes(self) -> None:
        """Keep the host bytes this step's copies hold under half the host cache (the other
        half is what `AdapterStore.prefetch` may fill): past it, wait for the copies and give
        their leases back. Otherwise a step loading more than the cache holds leaves the next
        read nothing to evict but this step's own leases, and it waits for a release that
        only this thread could make (seen on the H100 with 2,000 adapters: ~60 s stalls)."""
        if sum(f.nbytes for f in self._in_flight) > self.adapter_store.step_share_bytes:
            self._drain_copies()

    def _lease(self, load: LoadAdapter):
        """The adapter's host lease. When one step admits more adapters than the host cache
        holds at once, the leases of this step's earlier copies are what fills it: wait for
        those copies, give their leases back and try once more."""
        try:
            return self.adapter_store.get(load.path)
        except HostCacheFullError:
            self._drain_copies()
            return self.adapter_store.get(load.path)

    def _drain_copies(self) -> None:
        """Wait for every copy issued so far and give back all their host leases."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self._release_finished()

    def _release_finished(self) -> None:
        """Give back host leases whose copies have completed (pinned pages may then be reused)."""
        still = []
        for f in self._in_flight:
            if f.event is None or f.event.query():
                f.lease.close()
            else:
                still.append(f)
        self._in_flight = still

    # -- teardown ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the plugin's own work before vLLM tears the engine down (issue 17): wait for
        the adapter copies still in flight on the copy stream (they read pinned host memory and
        write KV pages the model runner is about to release) and give back their host leases,
        close the host store (queued loads cancelled, loader and reader threads joined: none
        is left reading into pinned memory or running torch CPU ops through vLLM's teardown and
        the interpreter's exit), withdraw the scheduler's link, then vLLM's shutdown.
        Idempotent; the store is closed even if the copy stream reports an error."""
        try:
            if getattr(self, "_in_flight", None):  # absent if start-up failed early
                self._drain_copies()
        finally:
            store, self.adapter_store = getattr(self, "adapter_store", None), None
            self._link = None
            try:
                if store is not None:
                    store.close()
            finally:
                super().shutdown()

    # -- adapters named outside a step (LLM.add_lora, the server's resolver) -----------------
    def add_lora(self, lora_request) -> bool:
        """Check the adapter's config and warm the host store; pages are the scheduler's to
        give, at admission. The check makes `vllm serve` answer a broken adapter at resolution
        (its resolver calls this; a failure becomes a 400 whose message carries the
        AdapterError, naming the adapter, the file and why: patches/openai_errors.py) instead
        of failing its requests later."""
        if self.adapter_store is not None:
            self.adapter_store.spec(lora_request.lora_path)
            self.adapter_store.prefetch([lora_request.lora_path])
        return True
