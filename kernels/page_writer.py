"""Raw adapter records (device staging) -> the adapter's rows in each layer's KV pages.

The host store keeps adapters in their raw form (`slora_plugin/raw_format.py`: per layer, A and
B as the file has them, unscaled); here the GPU does what the CPU is slow at: B transposed and
multiplied by its per-layer scale in fp32, rounded once to the serving dtype, exactly the bits
`layout.pack_layer` writes for (A, B * scale). Rows of a layer whose rank is below the module's
layout rank are written as zeros, and so are the page gaps no row covers, so every element of
the adapter's pages is written exactly once and nothing stale survives.

One launch handles a run of layer records in a staging buffer: grid (jobs, layers). A job is a
tile of one module's A or B (all its rows x a block of columns: reads are contiguous in the
source for A and for B, writes contiguous along each destination row) or a piece of a page gap.
Jobs depend only on the layout, so they are built once per layout (`writer_plan`) and cached
on the device by the caller; the per-load input is the block-id table.

`write_pages_ref` is the plain-torch reference (it decodes the records and calls
`layout.pack_layer`); the worker uses it on CPU, the tests compare the kernel with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from slora_plugin.layout import PageLayout, pack_layer
from slora_plugin.raw_format import RANKS_WORD, RawLayout

KIND_A, KIND_B, KIND_ZERO = 0, 1, 2
#: int32 fields of one job: kind, module slot, source offset (elements from the record start),
#: source row stride, source column stride, first entry in the row table, rows, first column,
#: end column.
JOB_FIELDS = 9
#: Elements per job tile (rows x columns).
TILE_ELEMS = 4096


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even. bf16 is rounded with integer ops (as torch does
    on the CPU) so that Triton's interpreter, which truncates, gives the GPU's bits too."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _page_writer_kernel(src_ptr, hdr_f32_ptr, hdr_i32_ptr, pools_ptr, blocks_ptr, rows_ptr, jobs_ptr,
                        layer0, rec_elems, rec_words, page_elems,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RANKS_AT: tl.constexpr):
    job = jobs_ptr + tl.program_id(0) * 9
    j = tl.program_id(1)  # record within the staged run
    kind = tl.load(job)
    row0 = tl.load(job + 5)
    c0 = tl.load(job + 7)
    c_end = tl.load(job + 8)
    dtype = src_ptr.dtype.element_ty
    pool = tl.load(pools_ptr + layer0 + j).to(tl.pointer_type(dtype), bitcast=True)
    if kind == 2:  # zero a piece of a page gap (it never straddles a page)
        # (names distinct from the other branch's: compiled Triton merges same-named values)
        span = c0 + tl.arange(0, BLOCK_R * BLOCK_C)
        gap = tl.load(rows_ptr + row0)
        gap_at = tl.load(blocks_ptr + gap // page_elems) * page_elems + gap % page_elems
        tl.store(pool + gap_at + span, tl.zeros([BLOCK_R * BLOCK_C], dtype), mask=span < c_end)
    else:
        slot = tl.load(job + 1)
        src_off = tl.load(job + 2)
        sk = tl.load(job + 3)
        sc = tl.load(job + 4)
        nrows = tl.load(job + 6)
        k = tl.arange(0, BLOCK_R)
        c = c0 + tl.arange(0, BLOCK_C)
        kmask = k < nrows
        mask = kmask[:, None] & (c < c_end)[None, :]
        rec = j.to(tl.int64) * rec_elems
        v = tl.load(src_ptr + rec + src_off + k[:, None] * sk + c[None, :] * sc, mask=mask, other=0)
        if kind == 1:  # B^T rows: scale in fp32, round once
            scale = tl.load(hdr_f32_ptr + j.to(tl.int64) * rec_words + slot)
            v = _round_to(v.to(tl.float32) * scale, dtype)
        rank = tl.load(hdr_i32_ptr + j.to(tl.int64) * rec_words + RANKS_AT + slot)
        v = tl.where((k < rank)[:, None], v, tl.zeros_like(v))
        local = tl.load(rows_ptr + row0 + k, mask=kmask, other=0)
        base = tl.load(blocks_ptr + local // page_elems, mask=kmask, other=0) * page_elems \
            + local % page_elems
        tl.store(pool + base[:, None] + c[None, :], v, mask=mask)


@dataclass(frozen=True)
class WriterPlan:
    """The jobs of one layout (CPU tensors; the caller keeps device copies)."""

    jobs: torch.Tensor  # (J, JOB_FIELDS) int32
    rows: torch.Tensor  # adapter-local element offsets: rows of A/B, starts of gap pieces
    block_r: int
    block_c: int


def page_gaps(layout: PageLayout) -> list[tuple[int, int]]:
    """(adapter-local offset, length) of the page ranges no row covers, split at page ends."""
    covered = sorted([(off, pl.in_features) for pl in layout.modules.values() for off in pl.a_rows]
                     + [(off, pl.out_features) for pl in layout.modules.values() for off in pl.b_rows])
    gaps, pos = [], 0
    for off, n in covered + [(layout.num_pages * layout.page_elems, 0)]:
        while pos < off:
            end = min(off, (pos // layout.page_elems + 1) * layout.page_elems)
            gaps.append((pos, end - pos))
            pos = end
        pos = max(pos, off + n)
    return gaps


def writer_plan(layout: PageLayout, raw: RawLayout) -> WriterPlan:
    """Every job that writes one layer of an adapter with this layout from its raw record."""
    max_rank = max((m.rank for m in raw.modules), default=1)
    block_r = max(2, triton.next_power_of_2(max_rank))
    block_c = max(16, TILE_ELEMS // block_r)
    jobs: list[tuple[int, ...]] = []
    rows: list[int] = []
    for rm in raw.modules:
        pl = layout.modules[rm.module]
        for kind, offsets, src, sk, sc, ncols in (
                (KIND_A, pl.a_rows, rm.a_offset, rm.in_features, 1, rm.in_features),
                (KIND_B, pl.b_rows, rm.b_offset, 1, rm.rank, rm.out_features)):
            row0 = len(rows)
            rows += offsets
            jobs += [(kind, rm.index, src, sk, sc, row0, rm.rank, c0, ncols)
                     for c0 in range(0, ncols, block_c)]
    for off, n in page_gaps(layout):
        row0 = len(rows)
        rows.append(off)
        jobs += [(KIND_ZERO, 0, 0, 0, 0, row0, 1, c0, n) for c0 in range(0, n, block_r * block_c)]
    return WriterPlan(torch.tensor(jobs, dtype=torch.int32).view(-1, JOB_FIELDS),
                      torch.tensor(rows, dtype=torch.int64), block_r, block_c)


def write_pages(pool_table: torch.Tensor, staging: torch.Tensor, raw: RawLayout, jobs: torch.Tensor,
                rows: torch.Tensor, block_r: int, block_c: int, blocks: torch.Tensor, layer0: int,
                num_records: int, page_elems: int) -> None:
    """Write `num_records` raw records at the start of `staging` (uint8) into layers
    `layer0..` of the pools whose base addresses `pool_table` (int64) holds, at the adapter's
    `blocks` (int64 block ids, page order). `jobs`/`rows`: a `WriterPlan`'s, on the device.
    Launches on the current stream."""
    if num_records <= 0 or jobs.shape[0] == 0:
        return
    if staging.numel() < num_records * raw.record_bytes:
        raise ValueError(f"{num_records} records of {raw.record_bytes} bytes do not fit in a "
                         f"staging buffer of {staging.numel()} bytes")
    if layer0 + num_records > pool_table.numel():
        raise ValueError(f"layers {layer0}..{layer0 + num_records - 1} but {pool_table.numel()} pools")
    _page_writer_kernel[(jobs.shape[0], num_records)](
        staging.view(raw.dtype), staging.view(torch.float32), staging.view(torch.int32),
        pool_table, blocks, rows, jobs, layer0, raw.record_elems, raw.record_bytes // 4, page_elems,
        BLOCK_R=block_r, BLOCK_C=block_c, RANKS_AT=RANKS_WORD)


def decode_record(record: torch.Tensor, raw: RawLayout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One layer's record (uint8) -> {module: (A, B * scale)} exactly as the pages hold them:
    B scaled in fp32 and rounded once, rows at or past the layer's rank zero."""
    scales = record[:RANKS_WORD * 4].view(torch.float32)
    ranks = record[RANKS_WORD * 4:2 * RANKS_WORD * 4].view(torch.int32)
    data = record.view(raw.dtype)
    out = {}
    for rm in raw.modules:
        live = int(ranks[rm.index])
        a = data[rm.a_offset:rm.a_offset + rm.rank * rm.in_features].view(rm.rank, rm.in_features).clone()
        b = data[rm.b_offset:rm.b_offset + rm.out_features * rm.rank].view(rm.out_features, rm.rank)
        b = (b.float() * scales[rm.index]).to(raw.dtype)  # fp32 tensor x fp32 0-dim: fp32 product
        a[live:] = 0
        b[:, live:] = 0
        out[rm.module] = (a, b)
    return out


def write_pages_ref(pools: Sequence[torch.Tensor], records: torch.Tensor, raw: RawLayout,
                    layout: PageLayout, block_ids: Sequence[int], layer0: int = 0) -> None:
    """Reference of `write_pages`: records (n, record_bytes) uint8 -> layers layer0.. of `pools`
    (flat, serving dtype)."""
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    for j in range(records.shape[0]):
        pages = torch.zeros(layout.num_pages, layout.page_elems, dtype=raw.dtype)
        pack_layer(layout, decode_record(records[j], raw), pages)
        pool = pools[layer0 + j].view(-1)
        view = pool[:pool.numel() // layout.page_elems * layout.page_elems].view(-1, layout.page_elems)
        view[blocks.to(pool.device)] = pages.to(pool.device)
