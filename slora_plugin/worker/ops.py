"""The `slora::lora_linear` custom op: paged LoRA for one vLLM linear layer.

Why an op keyed by the layer's name: torch.compile traces the model (and CUDA graphs are
captured) while vLLM is still profiling memory, before the real KV cache -- and therefore the page
pool -- exists; V2's profile run even activates LoRA. So the op takes the layer's name and looks
up the pool, the slot tables and the per-step segment metadata *when it runs*, the way vLLM's
attention op looks up its KV cache. With no pool yet (or an empty one) it leaves `y` unchanged.

How it is registered, for start-up time and per-call cost (see patches/layer_name.py):
  - the name is a vLLM `LayerName` (an opaque value torch.compile lifts as a graph input), not a
    str constant: the decoder layers' graph pieces stay identical, so vLLM compiles one and
    reuses it for the others instead of compiling every layer (~7x the compile time);
  - it mutates `y` in place like vLLM's own `lora_shrink`/`lora_expand`: Inductor re-inplaces it
    (no copy of `y`), and vLLM's punica path shows the same graph shape;
  - it is defined directly on a `torch.library.Library` (as vLLM's `direct_register_custom_op`
    does) rather than with `torch.library.custom_op`, whose Python dispatch costs ~4x more per
    call when the op runs outside a CUDA graph (eager, or prefill batches past the largest graph).

One `PagedLoRARuntime` per process holds that state; the worker's LoRA model manager installs it.

Compressed collections (`serve_compressed`): after the paged op, each slice whose (layer, module)
has resident bases runs `compressed_lora_linear` on the same `SegmentMeta`, so one batch mixes
plain and compressed adapters (a slot holds either kind: `tables.py`). Without it (an adapter
directory with no collection at engine start) the op is exactly the paged one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.library import Library

from slora_plugin.patches.layer_name import LayerNameType, resolve_layer_name
from slora_plugin.worker.compressed_bases import ResidentBases
from slora_plugin.worker.tables import SlotTables

#: Returns a layer's KV-cache tensor (whose storage is the pool), or None before it exists.
KVSource = Callable[[], "torch.Tensor | None"]


def pool_view(kv: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The whole storage of a layer's KV tensor, flat, in `dtype` (None if there is none yet).

    The storage, not the tensor's view, is the pool: blocks-first means block b is elements
    [b * page_elems, (b + 1) * page_elems) of it, whatever shape the backend views it as.
    """
    if kv is None or not isinstance(kv, torch.Tensor) or kv.numel() == 0:
        return None
    storage = kv.untyped_storage()
    itemsize = dtype.itemsize
    if storage.nbytes() == 0 or storage.nbytes() % itemsize:
        return None
    raw = torch.empty(0, dtype=torch.uint8, device=kv.device).set_(storage)
    return raw.view(dtype)


class PagedLoRARuntime:
    """Everything the op needs, at fixed addresses: tables, per-step token->slot, pools.

    `token_slot` holds, for the current step, the slot of each token (-1: no adapter; the tail
    past the step's tokens is -1 too, so padded CUDA-graph tokens get nothing on the reference
    path; the kernels' segment metadata lists only the step's tokens).
    """

    def __init__(self, num_slots: int, max_rank: int, max_tokens: int,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.tables = SlotTables(num_slots, max_rank, self.device)
        self.max_rank = max_rank
        self.max_tokens = max_tokens
        self.token_slot = torch.full((max_tokens,), -1, dtype=torch.int32, device=self.device)
        self.meta = None
        if self.device.type == "cuda":
            from slora_plugin.kernels.metadata import SegmentMeta

            self.meta = SegmentMeta(max_tokens, num_slots, self.device)
        self._sources: dict[str, KVSource] = {}
        self._pools: dict[str, tuple[tuple[int, int, torch.dtype], torch.Tensor]] = {}
        #: The compressed collections' resident bases (None: plain adapters only).
        self.compressed: ResidentBases | None = None
        self._workspace = None
        self._layer_of: dict[str, int] = {}
        #: Distinct adapters among the current step's tokens, when known (`set_token_slots`):
        #: picks the kernels' tiles of a batch too large for CUDA graphs (`tiling.choose_config`).
        self.adapters: int | None = None

    def serve_compressed(self, bases: ResidentBases, diagonal: bool, dtype: torch.dtype) -> None:
        """Serve compressed adapters whose clusters are `bases` (before CUDA graphs are
        captured: the core tables, the bases and the GEMM workspace keep their addresses)."""
        self.tables.enable_cores(bases.rank, diagonal)
        self.compressed = bases
        if self.meta is not None:
            from slora_plugin.kernels.compressed_lora import CompressedWorkspace

            self._workspace = CompressedWorkspace(self.max_tokens, max(bases.max_width, 1), dtype,
                                                  self.device)

    # -- wiring -------------------------------------------------------------------------
    def bind_layer(self, layer_key: str, source: KVSource) -> None:
        """Tell the op where layer `layer_key`'s pool comes from (resolved at every call)."""
        self._sources[layer_key] = source
        self._pools.pop(layer_key, None)

    def pool(self, layer_key: str, dtype: torch.dtype) -> torch.Tensor | None:
        source = self._sources.get(layer_key)
        if source is None:
            return None
        kv = source()
        if kv is None or kv.numel() == 0:
            return None
        key = (kv.untyped_storage().data_ptr(), kv.untyped_storage().nbytes(), dtype)
        cached = self._pools.get(layer_key)
        if cached is not None and cached[0] == key:
            return cached[1]
        pool = pool_view(kv, dtype)
        if pool is not None:
            self._pools[layer_key] = (key, pool)
        return pool

    # -- per step -----------------------------------------------------------------------
    def set_token_slots(self, slots: torch.Tensor, adapters: int | None = None) -> None:
        """Install this step's token -> slot map (once per step, not per layer) and, when the
        caller knows it, how many distinct adapters its tokens have."""
        self.adapters = adapters
        n = int(slots.shape[0])
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens in a step but the LoRA metadata holds {self.max_tokens}")
        self.token_slot[:n].copy_(slots.to(torch.int32), non_blocking=True)
        self.token_slot[n:].fill_(-1)
        if self.meta is not None:
            # only the step's real tokens: CUDA-graph padding rows past them get no adapter
            self.meta.update(self.token_slot[:n])

    # -- the op body --------------------------------------------------------------------
    def apply(self, y: torch.Tensor, x: torch.Tensor, layer_key: str,
              module_ids: list[int], slice_widths: list[int]) -> None:
        pool = self.pool(layer_key, x.dtype)
        if pool is None:
            return
        t = self.tables
        mids, widths = tuple(module_ids), tuple(slice_widths)
        if self.meta is not None and x.is_cuda:
            from slora_plugin.kernels.lora_linear import paged_lora_linear
            from slora_plugin.kernels.tiling import choose_config

            config = choose_config(x.shape[0], x.shape[1], self.max_rank, self.adapters)
            paged_lora_linear(y, x, pool, self.meta, t.a_addr, t.b_addr, t.ranks, t.scales,
                              mids, widths, self.max_rank, config)
        else:
            from slora_plugin.kernels.lora_linear import lora_linear_ref

            lora_linear_ref(y, x, pool, self.token_slot[: x.shape[0]], t.a_addr, t.b_addr,
                            t.ranks, t.scales, mids, widths)
        if self.compressed is not None:
            self._apply_compressed(y, x, pool, layer_key, mids, widths)

    def _apply_compressed(self, y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor,
                          layer_key: str, mids: tuple[int, ...], widths: tuple[int, ...]) -> None:
        """y's slices += their compressed adapters' deltas (one slice at a time: a module no
        resident cluster adapts in this layer costs nothing)."""
        assert self.compressed is not None and self.tables.cores is not None
        layer = self._layer_of.get(layer_key)
        if layer is None:
            from slora_plugin.worker.lora_layers import layer_index

            layer = self._layer_of[layer_key] = layer_index(layer_key)
        c = self.tables.cores
        off = 0
        for m, width in zip(mids, widths):
            bases = self.compressed.by_layer.get((layer, m))
            if bases is not None:
                ys = y[:, off:off + width]
                if self.meta is not None and x.is_cuda:
                    from slora_plugin.kernels.compressed_lora import compressed_lora_linear

                    compressed_lora_linear(ys, x, pool, self.meta, c.core_addr, c.has_core,
                                           c.slot_group, [bases], [m], [width], c.diagonal,
                                           self._workspace)
                else:
                    from slora_plugin.kernels.compressed_reference import compressed_lora_exact

                    ys.copy_(compressed_lora_exact(ys, x, pool, self.token_slot[: x.shape[0]],
                                                   c.core_addr, c.has_core, c.slot_group, [bases],
                                                   [m], [width], c.diagonal))
            off += width


_RUNTIME: PagedLoRARuntime | None = None


def install(runtime: PagedLoRARuntime | None) -> None:
    """Make `runtime` the one the op uses in this process (None: the op is a no-op)."""
    global _RUNTIME
    _RUNTIME = runtime


#: Holds the `slora` op namespace: an op lives as long as its library object.
_LIB = Library("slora", "FRAGMENT")


def lora_linear(y: torch.Tensor, x: torch.Tensor, layer: LayerNameType, module_ids: list[int],
                slice_widths: list[int]) -> None:
    """y[:, off_i:off_i+w_i] += LoRA_i(x) for the adapter of each token, slice i = module_ids[i];
    `layer` is the module name, encoded with `patches.layer_name.encode_layer_name`."""
    rt = _RUNTIME
    if rt is None:
        return
    rt.apply(y, x, resolve_layer_name(layer), module_ids, slice_widths)


def _lora_linear_fake(y: torch.Tensor, x: torch.Tensor, layer: LayerNameType,
                      module_ids: list[int], slice_widths: list[int]) -> None:
    return None


_LIB.define("lora_linear" + torch.library.infer_schema(lora_linear, mutates_args=["y"]))
for _key in ("CPU", "CUDA"):
    _LIB.impl("lora_linear", lora_linear, _key)
torch.library.register_fake("slora::lora_linear", _lora_linear_fake, lib=_LIB)
