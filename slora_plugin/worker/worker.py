"""`SLoRAWorker`: vLLM's GPU worker with adapters served from KV pages.

What it adds to `vllm.v1.worker.gpu_worker.Worker`:
  - first, in a child process, one torch CPU thread unless OMP_NUM_THREADS is set (`threads.py`:
    a forked engine core otherwise hangs on its first parallel CPU op if the parent used some);
  - at start, refuses configurations the unified pool does not support (clear message,
    `scope.py`);
  - `init_device` / `initialize_from_config`: the runner captures one set of CUDA graphs (with
    LoRA) and replays it for every batch, with or without adapters (`patches/lora_cudagraph.py`);
  - `load_model`: the model runner (V1 or V2) builds the plugin's LoRA manager, so vLLM's linear
    LoRA layers compute through the paged kernels and no stacked adapter buffers exist; if the
    adapter directory holds compressed collections, their bases are put on the device and the
    op serves them (`compressed_bases.directory_bases`, `PagedLoRARuntime.serve_compressed`,
    before any CUDA graph is captured), their bytes counted as model memory (out of the KV
    budget); with none, nothing of this exists;
  - `initialize_from_config`: after the KV cache exists, checks that one block id is one
    contiguous page of every layer, points each LoRA layer at its decoder layer's pool, and opens
    the host adapter store with that page size (`pool/adapter_pages.engine_store`, as the
    scheduler does);
  - `execute_model`: applies the scheduler's commands (evict, then load, then host prefetch)
    before the step runs (`adapter_copies.py`, which needs no vLLM). The host copies of all the
    step's loads start reading at once; loads copy each raw pinned adapter to the GPU and write
    its pages there (`page_loader.py`) on a copy stream that first waits for the compute stream
    (async scheduling may still run the previous step), and the compute stream waits for the
    loads before this step's forward. A load whose host copy is not in pinned memory yet blocks the step until
    the disk read is done: `host_waits` counts the loads that did and the seconds they waited;
  - publishes its host store (readiness oracle) and `host_waits` for a scheduler in the same
    process (`pool/worker_link.py`), which then admits only requests whose adapter is ready;
  - `shutdown`: waits for its copies and closes the host store (joins its threads) before
    vLLM's own teardown.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_worker import Worker

from slora_plugin.config import engine_settings
from slora_plugin.patches import kv_pool
from slora_plugin.patches import lora_cudagraph as graphs_patch
from slora_plugin.patches import lora_worker as worker_patch
from slora_plugin.patches.guard import SUPPORTED_VLLM
from slora_plugin.pool.adapter_pages import engine_dims, engine_store
from slora_plugin.pool.commands import StepCommands, commands_of
from slora_plugin.pool.worker_link import HostLoadWaits, WorkerLink, engine_key, publish
from slora_plugin.raw_format import record_bytes_bound
from slora_plugin.worker import scope
from slora_plugin.adapters.compressed import CompressedSpec
from slora_plugin.worker.adapter_copies import (HOST_ROOM_WAIT_S, AdapterCopies, apply_commands,
                                                check_served)
from slora_plugin.worker.compressed_bases import directory_bases
from slora_plugin.worker.lora_layers import layer_index
from slora_plugin.worker.lora_manager import SLoRAModelManager, SLoRAWorkerLoRAManager
from slora_plugin.worker.ops import pool_view
from slora_plugin.worker.page_loader import PageLoader
from slora_plugin.worker.threads import limit_child_torch_threads


logger = init_logger("vllm.slora.worker")


class SLoRAWorker(Worker):
    """vLLM's worker, serving LoRA adapters from KV pages (see the module docstring)."""

    def __init__(self, vllm_config, local_rank: int, rank: int, distributed_init_method: str,
                 is_driver_worker: bool = False) -> None:
        limit_child_torch_threads()
        scope.check_scope(vllm_config)
        self.slora_config = engine_settings(vllm_config)
        super().__init__(vllm_config=vllm_config, local_rank=local_rank, rank=rank,
                         distributed_init_method=distributed_init_method,
                         is_driver_worker=is_driver_worker)
        self.adapter_store = None
        self.page_elems = 0
        self._layer_pools: list[Any] = []  # decoder layer -> attention module (holds kv_cache)
        self._copies: AdapterCopies | None = None  # once the KV cache and the store exist
        #: Adapter loads by whether the step waited for the host copy (see worker_link).
        self.host_waits = HostLoadWaits()
        self._link: WorkerLink | None = None  # kept here: the registry holds it weakly
        #: (collection, cluster) keys of the resident compressed bases (empty: plain adapters).
        self._compressed_groups: frozenset = frozenset()

    # -- model ------------------------------------------------------------------------------
    def init_device(self) -> None:
        super().init_device()
        graphs_patch.capture_one_lora_case(self.model_runner, self.vllm_config.lora_config)

    def load_model(self, *args, **kwargs) -> None:
        with worker_patch.worker_lora_manager_class(SLoRAWorkerLoRAManager):
            super().load_model(*args, **kwargs)
        self._serve_collections()

    def _serve_collections(self) -> None:
        """The compressed collections of the adapter directory: bases resident, core tables
        and workspace allocated (here, before CUDA graphs are captured: their addresses are
        baked in), bytes out of the KV budget. Nothing when the directory holds none."""
        if not self.slora_config.adapter_dir:
            return
        dtype = self.model_config.dtype
        found = directory_bases(self.slora_config.adapter_dir,
                                engine_dims(self.vllm_config).num_hidden_layers, dtype, self.device)
        if found is None:
            return
        bases, diagonal = found
        self.slora_manager.runtime.serve_compressed(bases, diagonal, dtype)
        worker_patch.add_model_memory(self.model_runner, bases.nbytes)
        self._compressed_groups = frozenset(bases.groups)
        logger.info("slora: serving %d compressed cluster(s) of rank %d, bases %.1f MiB resident",
                    len(bases.groups), bases.rank, bases.nbytes / 2**20)

    @property
    def slora_manager(self) -> SLoRAModelManager:
        manager = getattr(self.model_runner, "lora_manager", None)
        model_manager = getattr(manager, "model_manager", None)
        if not isinstance(model_manager, SLoRAModelManager):
            raise RuntimeError("the model runner did not build the slora LoRA manager "
                               f"(got {type(manager).__name__}); is vLLM {SUPPORTED_VLLM} "
                               f"installed?")
        return model_manager

    # -- KV cache = page pool ---------------------------------------------------------------
    def initialize_from_config(self, kv_cache_config) -> None:
        page_size = kv_pool.check_kv_cache_config(kv_cache_config)
        super().initialize_from_config(kv_cache_config)
        graphs_patch.dispatch_to_lora_case(self.model_runner, self.vllm_config.lora_config)
        dtype = self.model_config.dtype
        self.page_elems = scope.page_elems(page_size, dtype)
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
                raise scope.SLoRAScopeError(f"{key}: decoder layer {li} has no attention KV cache")
            mgr.runtime.bind_layer(key, lambda m=self._layer_pools[li]: m.kv_cache)
        self._open_store(num_layers, dtype)

    def _open_store(self, num_layers: int, dtype: torch.dtype) -> None:
        scope.check_num_layers(engine_dims(self.vllm_config).num_hidden_layers, num_layers)
        c = self.slora_config
        store = engine_store(self.vllm_config, c, self.page_elems,
                             host_cache_bytes=c.host_cache_bytes, loader_threads=c.loader_threads,
                             wait_timeout_s=HOST_ROOM_WAIT_S)
        self.adapter_store = store
        self._link = WorkerLink(readiness=store, waits=self.host_waits)
        key = engine_key(self.vllm_config)
        publish(key, self._link)
        logger.info("slora: host adapter store published to the scheduler (engine %s, pid %d)",
                    key, os.getpid())
        copy_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        loader = PageLoader(self.device, record_bytes_bound(store.dims, c.max_lora_rank, dtype))
        self._copies = AdapterCopies(store, self.page_elems, loader, copy_stream, self.device,
                                     self.host_waits, self._link.failures,
                                     compressed_groups=self._compressed_groups)

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
        """`adapter_copies.apply_commands` with this worker's LoRA manager and KV pages."""
        apply_commands(commands, self.slora_manager, self._copies, self._pools)

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
            copies, self._copies = getattr(self, "_copies", None), None  # None if start-up failed early
            if copies is not None:
                copies.drain()
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
            spec = self.adapter_store.spec(lora_request.lora_path)
            if isinstance(spec, CompressedSpec):
                check_served(spec, self._compressed_groups)
            self.adapter_store.prefetch([lora_request.lora_path])
        return True
