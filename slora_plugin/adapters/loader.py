"""Read an adapter's safetensors file into its raw host form (see `slora_plugin/raw_format.py`).

Why raw: the page layout wants B transposed and scaled, which the CPU does at ~1.4 GB/s; the
GPU does it for free while it scatters the rows into pages (`kernels/page_writer.py`). So this
module only copies: the safetensors header is parsed here and every tensor whose dtype is the
serving dtype is read by `preadv` straight from the page cache into its place in the pinned
buffer (consecutive tensors in one call; no intermediate tensor, and the GIL is released while
the kernel copies, so loader threads scale). A tensor of another dtype is read into a scratch
tensor and converted (B with its scale folded in, one rounding: see raw_format.py), and so is a
B whose layer rank is below the module's layout rank (its rows are narrower).

Validation is unchanged: names, shapes and dtypes before any byte is read, and no NaN/Inf
(after scaling and conversion to the serving dtype) checked on the raw copy with vectorised
reductions, naming the first bad layer and module. The pages are written later, on the GPU,
only from an adapter that passed.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import BinaryIO

import torch
from safetensors import safe_open

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.peft_format import MODULE_PARENT, WEIGHTS_NAME, tensor_name
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.layout import ModelDims
from slora_plugin.raw_format import RawAdapter

#: PEFT's tensor names: `base_model.model.` prefix optional (some exporters drop it), and an
#: optional adapter-name segment (`lora_A.default.weight`, as in an unfiltered state_dict).
TENSOR_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
    r"(?:\.([A-Za-z0-9_\-]+))?\.weight$")
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
#: Bytes per element of every safetensors dtype (to check sizes before refusing the dtype).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: A header larger than this is not a LoRA adapter's (safetensors' own limit).
MAX_HEADER = 100_000_000
#: Buffers per `preadv` call (Linux IOV_MAX is 1024).
MAX_IOV = 512


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype name, shape, absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def open_weights(path: str) -> BinaryIO:
    """The weight file, unbuffered (every read is a `preadv` into its destination)."""
    return open(path, "rb", buffering=0)


def read_header(f: BinaryIO) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header: every tensor's bytes lie inside the file and match
    its shape and dtype. ValueError says what is wrong."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"the file has {size} bytes: no safetensors header")
    n = int.from_bytes(os.pread(f.fileno(), 8, 0), "little")
    if n > min(size - 8, MAX_HEADER):
        raise ValueError(f"header length {n} does not fit in the file ({size} bytes)")
    raw = os.pread(f.fileno(), n, 8)
    if len(raw) != n:
        raise ValueError("the file ended inside the header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = v["dtype"], v["shape"], v["data_offsets"]
            ok = isinstance(dtype, str) and all(type(x) is int and x >= 0 for x in (*shape, b, e))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {key!r} has a malformed header entry")
        if b > e or 8 + n + e > size:
            raise ValueError(f"tensor {key!r} lies past the end of the file (truncated?)")
        if dtype in ITEMSIZE and e - b != math.prod(shape) * ITEMSIZE[dtype]:
            raise ValueError(f"tensor {key!r} has {e - b} bytes, not those of {dtype} {list(shape)}")
        entries[key] = TensorEntry(dtype, tuple(shape), 8 + n + b, 8 + n + e)
    return entries


def tensor_map(keys: list[str], spec: AdapterSpec, dims: ModelDims) -> dict[tuple[int, str, str], str]:
    """(layer, module, "A"/"B") -> key in the file, for exactly the tensors the config implies;
    AdapterError for unknown, duplicate, unexpected or missing tensors."""
    found: dict[tuple[int, str, str], str] = {}
    for key in keys:
        mt = TENSOR_RE.match(key)
        if not mt or mt.group(3) not in MODULE_PARENT or MODULE_PARENT[mt.group(3)] != mt.group(2):
            raise AdapterError(spec.name, WEIGHTS_NAME, f"unexpected tensor {key!r} (not a LoRA A/B "
                                                        f"weight of a supported module)")
        layer, module, which = int(mt.group(1)), mt.group(3), mt.group(4)
        ranks = spec.plan.layer_ranks.get(module)
        if layer >= dims.num_hidden_layers or not ranks or not ranks[layer]:
            raise AdapterError(spec.name, WEIGHTS_NAME, f"extra tensor {key!r}: the config does not "
                                                        f"put LoRA on layer {layer} {module}")
        if (layer, module, which) in found:
            raise AdapterError(spec.name, WEIGHTS_NAME, f"duplicate tensors {found[(layer, module, which)]!r} "
                                                        f"and {key!r}")
        found[(layer, module, which)] = key
    for module, ranks in spec.plan.layer_ranks.items():
        for layer, r in enumerate(ranks):
            for which in "AB":
                if r and (layer, module, which) not in found:
                    raise AdapterError(spec.name, WEIGHTS_NAME,
                                       f"missing tensor {tensor_name(layer, module, which)!r}")
    return found


def read_raw(spec: AdapterSpec, dims: ModelDims, out: RawAdapter, readers: Executor | None = None,
             parts: int = 1) -> None:
    """Validate the weight file of `spec` and write its raw form into `out` (whose layout is
    `raw_layout(spec.layout, num_layers, dtype)`). With `readers`, the file's bytes are read in
    `parts` concurrent pieces. AdapterError for anything wrong."""
    name = spec.name
    try:
        with open_weights(spec.weights_file) as f:
            entries = read_header(f)
            names = tensor_map(list(entries), spec, dims)
            for (layer, module, which), key in names.items():
                _check_entry(entries[key], key, spec, dims, layer, module, which)
            _fill(f.fileno(), spec, entries, names, out, readers, parts)
    except AdapterError:
        raise
    except Exception as e:  # a corrupt or truncated file, or one changed while being read
        raise AdapterError(name, WEIGHTS_NAME, f"cannot be read: {type(e).__name__}: {e}") from None
    where = where_not_finite(out)
    if where:
        raise AdapterError(name, WEIGHTS_NAME, where)


def _check_entry(entry: TensorEntry, key: str, spec: AdapterSpec, dims: ModelDims, layer: int,
                 module: str, which: str) -> None:
    if entry.dtype not in DTYPES:
        raise AdapterError(spec.name, WEIGHTS_NAME, f"tensor {key!r} has dtype {entry.dtype}; "
                                                    f"supported: {sorted(DTYPES)}")
    r = spec.plan.layer_ranks[module][layer]
    fin, fout = dims.module_io(module)
    want = [r, fin] if which == "A" else [fout, r]
    if list(entry.shape) != want:
        raise AdapterError(spec.name, WEIGHTS_NAME, f"tensor {key!r} has shape {list(entry.shape)}, "
                                                    f"expected {want} (rank {r} from the config)")


def _fill(fd: int, spec: AdapterSpec, entries: dict[str, TensorEntry],
          names: dict[tuple[int, str, str], str], out: RawAdapter, readers: Executor | None = None,
          parts: int = 1) -> None:
    """Every record of `out`: header, A and B of every module (zero rows where the layer's rank
    is below the layout rank, or where the module is not adapted in that layer)."""
    raw, dtype = out.layout, out.layout.dtype
    isz, rb, L = dtype.itemsize, raw.record_bytes, raw.num_layers
    buf = out.buffer
    mv = memoryview(buf.numpy())
    slots = out.scales().shape[1]
    scales = [[0.0] * slots for _ in range(L)]  # Python lists: one tensor op at the end
    ranks = [[0] * slots for _ in range(L)]
    direct: list[tuple[int, int, memoryview]] = []  # (file begin, file end, destination)
    for rm in raw.modules:
        layer_ranks, layer_scales = spec.plan.layer_ranks[rm.module], spec.plan.layer_scales[rm.module]
        a_len, b_len = rm.rank * rm.in_features * isz, rm.out_features * rm.rank * isz
        for layer in range(L):
            r = layer_ranks[layer]
            a_at, b_at = layer * rb + rm.a_offset * isz, layer * rb + rm.b_offset * isz
            ranks[layer][rm.index] = r
            if not r:
                buf[a_at:a_at + a_len].zero_()
                buf[b_at:b_at + b_len].zero_()
                continue
            scale = layer_scales[layer]
            a = entries[names[(layer, rm.module, "A")]]
            if DTYPES[a.dtype] == dtype:
                direct.append((a.begin, a.end, mv[a_at:a_at + a.end - a.begin]))
            else:
                out.a(rm.module)[layer, :r].copy_(_read_tensor(fd, a))
            if r < rm.rank:
                buf[a_at + r * rm.in_features * isz:a_at + a_len].zero_()
            b = entries[names[(layer, rm.module, "B")]]
            if DTYPES[b.dtype] == dtype and r == rm.rank:
                direct.append((b.begin, b.end, mv[b_at:b_at + b_len]))
            else:
                dst = out.b(rm.module)[layer]
                src = _read_tensor(fd, b)
                if src.dtype == dtype:
                    dst[:, :r].copy_(src)
                else:  # convert once with the scale folded in (fp32 math, one rounding)
                    torch.mul(src if src.dtype == torch.float32 else src.float(), scale, out=dst[:, :r])
                    scale = 1.0
                dst[:, r:].zero_()
            scales[layer][rm.index] = scale
    out.scales().copy_(torch.tensor(scales, dtype=torch.float32))
    out.layer_ranks().copy_(torch.tensor(ranks, dtype=torch.int32))
    direct.sort(key=lambda t: t[0])
    total = sum(e - b for b, e, _ in direct)
    pieces, cut, done = [], 0, 0
    for i, (b, e, _) in enumerate(direct):  # `parts` slices of about equal bytes
        done += e - b
        if done * parts >= total * (len(pieces) + 1) or i == len(direct) - 1:
            pieces.append(direct[cut:i + 1])
            cut = i + 1
    if readers is None or len(pieces) < 2:
        for piece in pieces:
            _read_runs(fd, piece)
    else:
        for future in [readers.submit(_read_runs, fd, piece) for piece in pieces]:
            future.result()


def _read_runs(fd: int, direct: list[tuple[int, int, memoryview]]) -> None:
    """Read (file begin, file end, destination) entries sorted by begin: one `preadv` per run
    of tensors that follow each other in the file."""
    i = 0
    while i < len(direct):
        j = i + 1
        while j < len(direct) and j - i < MAX_IOV and direct[j][0] == direct[j - 1][1]:
            j += 1
        _pread_into(fd, [d for _, _, d in direct[i:j]], direct[i][0])
        i = j


def _read_tensor(fd: int, entry: TensorEntry) -> torch.Tensor:
    t = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    _pread_into(fd, [memoryview(t.view(-1).view(torch.uint8).numpy())], entry.begin)
    return t


def _pread_into(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Fill `bufs` with the file's bytes from `offset` on (short reads continued)."""
    while bufs:
        n = os.preadv(fd, bufs, offset)
        if n <= 0:
            raise EOFError("the file ended early (truncated while being read?)")
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if bufs and n:
            bufs = [bufs[0][n:]] + bufs[1:]


def where_not_finite(out: RawAdapter) -> str | None:
    """The first layer/module whose A or (scaled, converted) B has a NaN or Inf, else None.

    One vectorised reduction per module and matrix over all layers: a sum is NaN/Inf iff an
    element is, or it overflowed (then the layer is looked at closely). B is multiplied by its
    scale on the GPU; where a scale exceeds 1 the product may overflow the dtype, so there the
    largest |B| (amax and amin) times the scale is checked, rounded as the GPU rounds it.
    """
    raw, dtype = out.layout, out.layout.dtype
    bad: list[tuple[int, int, str]] = []
    for rm in raw.modules:
        a = out.a(rm.module).flatten(1)
        b = out.b(rm.module).flatten(1)
        scale = out.scales()[:, rm.index].abs()
        bad += [(l, rm.index, "A") for l in rows_not_finite(a)]
        if bool((scale > 1).any()):
            peak = torch.maximum(b.amax(1), -b.amin(1)).float()
            bad += [(int(l), rm.index, "B") for l in torch.nonzero(~(peak * scale).to(dtype).isfinite())]
        else:
            bad += [(l, rm.index, "B") for l in rows_not_finite(b)]
    if not bad:
        return None
    layer, index, which = min(bad)
    module = next(rm.module for rm in raw.modules if rm.index == index)
    return (f"layer {layer} {module} lora_{which} has NaN or Inf values (after scaling and "
            f"conversion to {dtype})")


def rows_not_finite(x: torch.Tensor) -> list[int]:
    """Indices of the rows of 2-D `x` with a NaN or Inf: a row's sum is looked at first (~60x
    faster than `isfinite` over fp16 on a CPU core), the row itself only when its sum is not
    finite (an element is not, or the sum overflowed)."""
    sums = x.sum(1)
    return [int(l) for l in torch.nonzero(~sums.isfinite()) if not bool(x[int(l)].isfinite().all())]


def check_weights_file(name: str, path: str) -> None:
    """Model-free checks of a weight file (for `adapters check` without --model): readable,
    only PEFT LoRA tensor names, supported dtypes, A/B ranks that agree, finite values."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes: dict[tuple[str, str], dict[str, list[int]]] = {}
            for key in f.keys():
                mt = TENSOR_RE.match(key)
                if not mt or MODULE_PARENT.get(mt.group(3)) != mt.group(2):
                    raise AdapterError(name, WEIGHTS_NAME, f"unexpected tensor {key!r} (not a LoRA A/B "
                                                           f"weight of a supported module)")
                sl = f.get_slice(key)
                if sl.get_dtype() not in DTYPES:
                    raise AdapterError(name, WEIGHTS_NAME, f"tensor {key!r} has dtype {sl.get_dtype()}; "
                                                           f"supported: {sorted(DTYPES)}")
                shapes.setdefault((mt.group(1), mt.group(3)), {})[mt.group(4)] = list(sl.get_shape())
                t = f.get_tensor(key)
                if not math.isfinite(float(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
                    raise AdapterError(name, WEIGHTS_NAME, f"tensor {key!r} has NaN or Inf values")
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(name, WEIGHTS_NAME, f"cannot be read: {type(e).__name__}: {e}") from None
    for (layer, module), ab in shapes.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(name, WEIGHTS_NAME, f"layer {layer} {module}: lora_A and lora_B must both "
                                                   f"be present, found only lora_{''.join(ab)}")
        if len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise AdapterError(name, WEIGHTS_NAME, f"layer {layer} {module}: lora_A {ab['A']} and "
                                                   f"lora_B {ab['B']} do not share a rank")
