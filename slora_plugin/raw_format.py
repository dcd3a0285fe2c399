"""The raw host form of an adapter: what the host store reads from disk and the GPU turns into pages.

Why not pack pages on the host: writing B transposed (and scaled) on the CPU runs at ~1.4 GB/s
per thread, a plain copy at 20+ GB/s. So the host keeps an adapter the way its file has it --
per module A (r, in) and B (out, r), unscaled, in the serving dtype -- and the GPU transposes,
scales and scatters rows into the KV pages (`kernels/page_writer.py`), where that costs nothing.

One *record* per layer, so a layer (or a run of layers) is one contiguous host -> device copy:

  bytes [0, 32)   fp32 scale of each module, by `MODULE_INDEX` (slot 7 unused); the value
                  multiplies B on the GPU (1.0 where the host already folded it in, see below);
  bytes [32, 64)  int32 rank of each module in this layer (0: not adapted in this layer);
  bytes [64, ..)  for each module of the layout, in `MODULES` order: A (R_m, in_m) then
                  B (out_m, R_m), row-major, in the serving dtype; R_m is the module's layout
                  rank (its largest over the layers); rows k >= this layer's rank are zero;
  record size rounded up to 64 bytes.

The host folds the scale into B itself only when the file's dtype differs from the serving
dtype (it must convert anyway, and one rounding of B * scale is the exact result); then the
header holds 1.0. Pure torch, no vLLM: the store and the worker both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from slora_plugin.layout import MODULE_INDEX, MODULES, ModelDims, PageLayout

HEADER_BYTES = 64
RECORD_ALIGN = 64
#: Scale / rank slots in the header (`MODULES` has 7).
HEADER_SLOTS = 8
RANKS_WORD = HEADER_SLOTS  # int32 word of the first rank slot


@dataclass(frozen=True)
class RawModule:
    """One module's A and B inside every record, as element offsets from the record start."""

    module: str
    index: int  # MODULE_INDEX[module]: the header slot
    rank: int  # R_m, the layout rank
    in_features: int
    out_features: int
    a_offset: int  # A (rank, in_features), row-major
    b_offset: int  # B (out_features, rank), row-major


@dataclass(frozen=True)
class RawLayout:
    """Where everything sits in an adapter's raw form (identical for every layer)."""

    dtype: torch.dtype
    num_layers: int
    record_bytes: int
    modules: tuple[RawModule, ...]

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.record_bytes

    @property
    def record_elems(self) -> int:
        return self.record_bytes // self.dtype.itemsize

    @property
    def data_bytes(self) -> int:
        """The weight bytes of all layers (what a load really moves)."""
        return self.num_layers * sum(m.rank * (m.in_features + m.out_features)
                                     for m in self.modules) * self.dtype.itemsize


def raw_layout(layout: PageLayout, num_layers: int, dtype: torch.dtype) -> RawLayout:
    """The raw form of an adapter whose page layout is `layout` (cached: thousands of adapters
    share a handful of rank combinations)."""
    key = tuple((m, p.rank, p.in_features, p.out_features) for m, p in layout.modules.items())
    return _raw_layout(key, num_layers, dtype)


@lru_cache(maxsize=1024)
def _raw_layout(key: tuple[tuple[str, int, int, int], ...], num_layers: int,
                dtype: torch.dtype) -> RawLayout:
    itemsize = dtype.itemsize
    pos = HEADER_BYTES // itemsize
    mods = []
    for m, r, fin, fout in sorted(key, key=lambda t: MODULE_INDEX[t[0]]):
        mods.append(RawModule(m, MODULE_INDEX[m], r, fin, fout, pos, pos + r * fin))
        pos += r * (fin + fout)
    record = -(-pos * itemsize // RECORD_ALIGN) * RECORD_ALIGN
    return RawLayout(dtype, num_layers, record, tuple(mods))


def record_bytes_bound(dims: ModelDims, max_rank: int, dtype: torch.dtype) -> int:
    """The largest record any valid adapter can have: `max_rank` on every module."""
    elems = sum(max_rank * sum(dims.module_io(m)) for m in MODULES)
    return -(-(HEADER_BYTES + elems * dtype.itemsize) // RECORD_ALIGN) * RECORD_ALIGN


@dataclass(frozen=True)
class RawAdapter:
    """An adapter's raw form: `buffer` (uint8, `layout.nbytes`, pinned in the host cache) read
    through `layout`. The views below share its memory."""

    buffer: torch.Tensor
    layout: RawLayout

    def __post_init__(self) -> None:
        if self.buffer.dtype != torch.uint8 or self.buffer.dim() != 1 \
                or self.buffer.numel() != self.layout.nbytes:
            raise ValueError(f"a raw adapter buffer must be {self.layout.nbytes} uint8 bytes, got "
                             f"{self.buffer.dtype} {tuple(self.buffer.shape)}")

    def records(self) -> torch.Tensor:
        """(num_layers, record_bytes) uint8."""
        return self.buffer.view(self.layout.num_layers, self.layout.record_bytes)

    def scales(self) -> torch.Tensor:
        """(num_layers, 8) fp32: the header's scale of each module slot."""
        return self.records()[:, :RANKS_WORD * 4].view(torch.float32)

    def layer_ranks(self) -> torch.Tensor:
        """(num_layers, 8) int32: the header's rank of each module slot in each layer."""
        return self.records()[:, RANKS_WORD * 4:HEADER_BYTES].view(torch.int32)

    def module(self, module: str) -> RawModule:
        for rm in self.layout.modules:
            if rm.module == module:
                return rm
        raise KeyError(f"{module} is not in this adapter's layout")

    def a(self, module: str) -> torch.Tensor:
        """(num_layers, R, in) view of module's A in every layer."""
        m = self.module(module)
        return self._view(m.a_offset, m.rank * m.in_features).view(-1, m.rank, m.in_features)

    def b(self, module: str) -> torch.Tensor:
        """(num_layers, out, R) view of module's B in every layer (unscaled unless header is 1.0)."""
        m = self.module(module)
        return self._view(m.b_offset, m.out_features * m.rank).view(-1, m.out_features, m.rank)

    def _view(self, offset: int, numel: int) -> torch.Tensor:
        isz = self.layout.dtype.itemsize
        return self.records()[:, offset * isz:(offset + numel) * isz].view(self.layout.dtype)
