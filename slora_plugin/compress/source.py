"""Read a directory of PEFT adapters for joint compression, one (layer, module) at a time.

Why per (layer, module): 1,000 all-linear rank-16 adapters of an 8B model are ~84 GB; one
(layer, module) of all of them is at most a few GB (gate_proj, rank 64: 2.4 GB in fp16), and the
compression of a (layer, module) needs nothing else. So the adapters are validated once (config
and weight-file headers), and each pass then `pread`s exactly the A and B tensors it needs.

Validation is the server's own (`adapters/`): names from `AdapterIndex` (nested names, no
symlink escapes), the config through `build_spec` (peft's matching of `target_modules`,
`rank_pattern`, `alpha_pattern`, rsLoRA: the per-layer rank and scale the pages would get), the
weight file through `read_header` + `tensor_map` + the loader's `_check_entry` (names, shapes,
dtypes, sizes before a byte is read), tensors read with the loader's `_read_tensor` (`pread`);
values are checked finite as they are read. The scale is folded into B in the compute
dtype, as the page writer folds it on the GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.loader import (
    DTYPES, TENSOR_RE, TensorEntry, _check_entry, _read_tensor, open_weights, read_header, tensor_map)
from slora_plugin.adapters.peft_format import WEIGHTS_NAME
from slora_plugin.adapters.spec import AdapterSpec, build_spec, files_key
from slora_plugin.layout import MODULES, ModelDims


class CompressError(ValueError):
    """The collection cannot be compressed as asked; `problems` lists every bad adapter."""

    def __init__(self, message: str, problems: Sequence[AdapterError] = ()) -> None:
        self.problems = list(problems)
        lines = [message] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class SourceAdapter:
    """One validated adapter: its plan (rank and scale per module and layer) and where each of
    its A / B tensors lies in its weight file."""

    name: str
    spec: AdapterSpec
    tensors: Mapping[tuple[int, str, str], TensorEntry]  # (layer, module, "A" / "B") -> entry

    def rank(self, layer: int, module: str) -> int:
        ranks = self.spec.plan.layer_ranks.get(module)
        return ranks[layer] if ranks else 0

    def scale(self, layer: int, module: str) -> float:
        return self.spec.plan.layer_scales[module][layer]


def open_collection(src_dir: str, dims: ModelDims, max_rank: int = 128,
                    progress: bool = False) -> list[SourceAdapter]:
    """Every adapter of `src_dir` (sorted by name), validated like the server validates it;
    CompressError listing every problem if any adapter is bad (a collection is compressed
    whole or not at all: the bases depend on every member)."""
    from tqdm import tqdm

    index = AdapterIndex(src_dir)
    names = index.scan(collections=False)
    problems: list[AdapterError] = list(index.skipped)
    page = max(max(dims.module_io(m)) for m in MODULES)  # one widest row per page: any layout fits
    adapters = []
    for name in tqdm(names, desc="validating adapters", unit="adapter", disable=not progress):
        try:
            path = index.locate(name)
            spec = build_spec(name, path, files_key(path), dims, page, max_rank)
            with open_weights(spec.weights_file) as f:
                try:
                    entries = read_header(f)
                except (ValueError, OSError) as e:
                    raise AdapterError(name, WEIGHTS_NAME, f"cannot be read: {e}") from None
            keys = tensor_map(list(entries), spec, dims)
            for (layer, module, which), key in keys.items():
                _check_entry(entries[key], key, spec, dims, layer, module, which)
            adapters.append(SourceAdapter(name, spec, {k: entries[v] for k, v in keys.items()}))
        except AdapterError as e:
            problems.append(e)
    if problems:
        raise CompressError(f"{len(problems)} adapter(s) of {src_dir} cannot be compressed:", problems)
    if not adapters:
        raise CompressError(f"no adapters found in {src_dir}")
    return adapters


def infer_dims(src_dir: str) -> ModelDims:
    """Model dims from the adapters' weight-file headers alone (no base model at hand).

    The compression needs only each module's (in, out) and the layer count; both are in the
    shapes. Attention heads are not (only their products are): head_dim is taken as the gcd of
    the q and k/v widths, which gives the same `module_io`. A module no adapter has gets a
    placeholder width (never used). Adapters that disagree on a width cannot share a base model:
    CompressError. With the base model's config (`--model`) use `ModelDims.from_hf_config` instead.
    """
    index = AdapterIndex(src_dir)
    io: dict[str, tuple[int, int]] = {}
    layers = 0
    for name in index.scan(collections=False):
        path = os.path.join(index.locate(name), WEIGHTS_NAME)
        try:
            with open_weights(path) as f:
                entries = read_header(f)
        except (OSError, ValueError) as e:
            raise CompressError(f"adapter {name!r}, file {WEIGHTS_NAME}: cannot be read: {e}") from None
        for key, entry in entries.items():
            mt = TENSOR_RE.match(key)
            if not mt or mt.group(3) not in MODULES or len(entry.shape) != 2:
                continue
            layers = max(layers, int(mt.group(1)) + 1)
            module, which = mt.group(3), mt.group(4)
            fin, fout = io.get(module, (0, 0))
            width = entry.shape[1] if which == "A" else entry.shape[0]
            known = fin if which == "A" else fout
            if known and known != width:
                raise CompressError(f"adapter {name!r}: {module} lora_{which} has width {width}, "
                                    f"other adapters {known}: they do not share a base model")
            io[module] = (width, fout) if which == "A" else (fin, width)
    if not io:
        raise CompressError(f"no LoRA tensors found in {src_dir}")

    def width(*options: tuple[str, int]) -> int:
        for module, side in options:
            if io.get(module, (0, 0))[side]:
                return io[module][side]
        return 0

    hidden = width(("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("gate_proj", 0), ("up_proj", 0),
                   ("o_proj", 1), ("down_proj", 1))
    q_out = width(("q_proj", 1), ("o_proj", 0)) or hidden
    kv_out = width(("k_proj", 1), ("v_proj", 1)) or q_out
    inter = width(("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)) or hidden
    head_dim = math.gcd(q_out, kv_out)
    return ModelDims(hidden_size=hidden, num_attention_heads=q_out // head_dim,
                     num_key_value_heads=kv_out // head_dim, head_dim=head_dim,
                     intermediate_size=inter, num_hidden_layers=layers)


@dataclass(frozen=True)
class ModuleStack:
    """One (layer, module) of every member adapter that has it, zero-padded to the largest rank
    R among them (zero rows and columns change no product): A (n, R, d_in) and B (n, d_out, R) in
    the files' dtype (promoted when they differ), `scales` (n,) fp64, `members` the indices of
    the adapters in the collection's list."""

    members: tuple[int, ...]
    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def select(self, positions: Sequence[int]) -> "ModuleStack":
        """The members at `positions` of this stack (a cluster's share)."""
        idx = torch.as_tensor(list(positions), dtype=torch.int64)
        return ModuleStack(tuple(self.members[i] for i in positions), self.a[idx], self.b[idx], self.scales[idx])

    def chunks(self, size: int, device: torch.device | str,
               dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(scale * B, A) of `size` members at a time, on `device` in `dtype`: how every pass
        of the compression sees the factors (host memory holds the stack, the device a chunk)."""
        for lo in range(0, len(self.members), size):
            b = self.b[lo:lo + size].to(device=device, dtype=dtype)
            s = self.scales[lo:lo + size].to(device=device, dtype=dtype)
            yield b * s[:, None, None], self.a[lo:lo + size].to(device=device, dtype=dtype)


def read_module(adapters: Sequence[SourceAdapter], layer: int, module: str,
                dims: ModelDims) -> ModuleStack | None:
    """The ModuleStack of (layer, module) over `adapters` (None when no adapter has it)."""
    members = [i for i, ad in enumerate(adapters) if ad.rank(layer, module)]
    if not members:
        return None
    fin, fout = dims.module_io(module)
    rank = max(adapters[i].rank(layer, module) for i in members)
    dtypes = {DTYPES[adapters[i].tensors[(layer, module, w)].dtype] for i in members for w in "AB"}
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    a = torch.zeros(len(members), rank, fin, dtype=dtype)
    b = torch.zeros(len(members), fout, rank, dtype=dtype)
    scales = torch.zeros(len(members), dtype=torch.float64)
    for j, i in enumerate(members):
        ad = adapters[i]
        r = ad.rank(layer, module)
        try:
            with open_weights(ad.spec.weights_file) as f:
                ta = _read_tensor(f.fileno(), ad.tensors[(layer, module, "A")])
                tb = _read_tensor(f.fileno(), ad.tensors[(layer, module, "B")])
        except (OSError, EOFError) as e:
            raise CompressError(f"adapter {ad.name!r}, file {WEIGHTS_NAME}: cannot be read: {e}") from None
        for which, t in (("A", ta), ("B", tb)):
            if not bool(torch.isfinite(t).all()):
                raise CompressError(f"adapter {ad.name!r}, file {WEIGHTS_NAME}: layer {layer} {module} "
                                    f"lora_{which} has NaN or Inf values")
        a[j, :r] = ta
        b[j, :, :r] = tb
        scales[j] = ad.scale(layer, module)
    return ModuleStack(tuple(members), a, b, scales)
