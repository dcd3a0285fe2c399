"""`PageLoader`: a raw pinned adapter -> its rows in every layer's KV pages, on the GPU.

The host store hands over the adapter in its raw form (`slora_plugin/raw_format.py`, one record
per layer); the transpose and scale of B happen here, in `kernels/page_writer.py`, because the
GPU does them at memory speed where the CPU managed ~1 GB/s.

Per load, on the worker's copy stream (which already waits for the compute stream): runs of
whole layer records are copied into one of two preallocated device staging buffers (one H2D
copy per run), and the page writer, on a second stream, turns each run into pages while the
next run is being copied into the other buffer. Events order the two streams; at the end the
copy stream waits for the writer, so an event recorded on it afterwards covers the whole load
(the worker releases the host lease on it, and the compute stream waits for it).

The staging buffers are allocated once, sized for the largest record the configuration allows
(`max_lora_rank` on every module), so any valid adapter's layer fits. On a CPU device (tests)
the load is the page writer's torch reference, synchronous.
"""

from __future__ import annotations

from typing import Sequence

import torch

from slora_plugin.kernels.page_writer import write_pages, write_pages_ref, writer_plan
from slora_plugin.layout import PageLayout
from slora_plugin.raw_format import RawAdapter


class PageLoader:
    """Writes raw adapters into pages on one device (see the module docstring)."""

    def __init__(self, device: torch.device | str, staging_bytes: int) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.staging_bytes = staging_bytes
        self._staging: list[torch.Tensor] = []
        self._free: list[torch.cuda.Event | None] = [None, None]  # last writer reading each buffer
        self._next = 0
        self._write_stream: torch.cuda.Stream | None = None
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._pool_key: tuple[int, ...] = ()
        self._pool_table: torch.Tensor | None = None
        if self.cuda:
            self._staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=self.device)
                             for _ in range(2)]
            self._write_stream = torch.cuda.Stream(device=self.device)

    def load(self, pools: Sequence[torch.Tensor], raw: RawAdapter, layout: PageLayout,
             block_ids: Sequence[int]) -> None:
        """Write `raw` into layer l's pool (flat, serving dtype) at blocks `block_ids` (page
        order), for every layer. CUDA: asynchronous, call it on the copy stream, with `raw`
        pinned and kept alive until an event recorded on that stream afterwards completes."""
        rl = raw.layout
        if rl.num_layers != len(pools):
            raise ValueError(f"the adapter has {rl.num_layers} layers but there are {len(pools)} pools")
        if len(block_ids) != layout.num_pages:
            raise ValueError(f"the adapter needs {layout.num_pages} pages but got {len(block_ids)} blocks")
        if not self.cuda:
            write_pages_ref(pools, raw.records(), rl, layout, block_ids)
            return
        per_run = self.staging_bytes // rl.record_bytes
        if per_run == 0:
            raise ValueError(f"a layer record of {rl.record_bytes} bytes is larger than the staging "
                             f"buffer ({self.staging_bytes} bytes): is the adapter's rank above "
                             f"max_lora_rank?")
        copy = torch.cuda.current_stream(self.device)
        write = self._write_stream
        jobs, rows, block_r, block_c = self._plan(layout, raw)
        table = self._pools(pools)
        blocks = torch.tensor(list(block_ids), dtype=torch.int64).pin_memory().to(
            self.device, non_blocking=True)
        blocks.record_stream(write)
        write.wait_stream(copy)  # after the compute stream (via copy) and the uploads above
        for layer0 in range(0, rl.num_layers, per_run):
            n = min(per_run, rl.num_layers - layer0)
            b = self._next
            self._next ^= 1
            if self._free[b] is not None:
                copy.wait_event(self._free[b])
            staged = self._staging[b]
            staged[:n * rl.record_bytes].copy_(
                raw.buffer[layer0 * rl.record_bytes:(layer0 + n) * rl.record_bytes], non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(copy)
            write.wait_event(arrived)
            with torch.cuda.stream(write):
                write_pages(table, staged, rl, jobs, rows, block_r, block_c, blocks, layer0, n,
                            layout.page_elems)
            done = torch.cuda.Event()
            done.record(write)
            self._free[b] = done
        copy.wait_stream(write)

    def load_cores(self, pools: Sequence[torch.Tensor], cores: torch.Tensor,
                   block_ids: Sequence[int]) -> None:
        """Write a compressed adapter's cores (its host form, `compressed.read_cores`:
        (num_layers, num_pages, page_elems), serving dtype, each layer's record its pages as they
        are) into layer l's pool at blocks `block_ids`: a plain row copy, no packing. CUDA: one
        host-to-device copy per (layer, page), straight from pinned `cores` into the pool, on the
        current (copy) stream, asynchronously (the caller holds `cores` until that stream is past
        these copies). No device buffer: an adapter-sized allocation per load, as this once made,
        asks the caching allocator for ~1 GB in a step that admits 128 adapters, beside a KV
        cache that fills the GPU (the plain path's staging buffers are allocated once)."""
        layers, num_pages, page_elems = cores.shape
        if layers != len(pools):
            raise ValueError(f"the adapter has {layers} layers but there are {len(pools)} pools")
        if len(block_ids) != num_pages:
            raise ValueError(f"the adapter needs {num_pages} pages but got {len(block_ids)} blocks")
        non_blocking = self.cuda and cores.is_pinned()
        for layer, pool in enumerate(pools):
            for page, block in enumerate(block_ids):
                pool[block * page_elems:(block + 1) * page_elems].copy_(cores[layer, page],
                                                                        non_blocking=non_blocking)

    def _plan(self, layout: PageLayout, raw: RawAdapter) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The writer's jobs for this layout, on the device (built once per layout)."""
        key = (layout.page_elems, tuple((m, p.rank, p.in_features, p.out_features)
                                        for m, p in layout.modules.items()), raw.layout.dtype)
        cached = self._plans.get(key)
        if cached is None:
            plan = writer_plan(layout, raw.layout)
            cached = self._plans[key] = (
                plan.jobs.pin_memory().to(self.device, non_blocking=True),
                plan.rows.pin_memory().to(self.device, non_blocking=True), plan.block_r, plan.block_c)
        return cached

    def _pools(self, pools: Sequence[torch.Tensor]) -> torch.Tensor:
        """Device table of each layer's pool address (rebuilt only if a pool moved)."""
        key = tuple(p.data_ptr() for p in pools)
        if key != self._pool_key or self._pool_table is None:
            if self._pool_table is not None:
                self._pool_table.record_stream(self._write_stream)
            self._pool_table = torch.tensor(key, dtype=torch.int64).pin_memory().to(
                self.device, non_blocking=True)
            self._pool_key = key
        return self._pool_table
