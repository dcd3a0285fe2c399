"""`compress_collection`: a directory of PEFT adapters -> a compressed collection directory.

One pass per (layer, module): read that slice of every adapter (`source.read_module`), compress
each cluster's members jointly (`joint.compress_module`), keep the bases and cores (small), move
on. Host memory holds one (layer, module) of the collection plus all bases and cores; the device
one chunk (`JointOptions.chunk_bytes`). With `clusters` > 1 a first pass computes the adapters'
sketch features (`clustering`), so the source is read twice.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from slora_plugin.compress.clustering import kmeans, sketch_features
from slora_plugin.compress.collection import (
    STORAGE_DTYPES, Manifest, bases_path, cores_path, tensor_key, write_collection)
from slora_plugin.compress.joint import JointOptions, compress_module
from slora_plugin.compress.report import build_report, write_report
from slora_plugin.compress.source import (
    CompressError, ModuleStack, SourceAdapter, infer_dims, open_collection, read_module)
from slora_plugin.layout import MODULES, ModelDims


def compress_collection(src_dir: str, out_dir: str, rank: int, *, clusters: int = 1, diagonal: bool = False,
                        dims: ModelDims | None = None, iters: int = 2, dtype: torch.dtype = torch.float16,
                        device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                        max_rank: int = 128, seed: int = 0, progress: bool = False) -> dict:
    """Compress every adapter of `src_dir` into `out_dir` (created; must be empty) and return the
    report (also written there). `dims`: the base model's (else inferred from the adapters'
    shapes); `dtype`: the storage dtype of bases and cores; `device`: CUDA when present;
    `compute_dtype`: fp32 on CUDA, fp64 on the CPU. CompressError for a bad collection or request."""
    from tqdm import tqdm

    storage_names = {v: k for k, v in STORAGE_DTYPES.items()}
    if dtype not in storage_names:
        raise CompressError(f"storage dtype {dtype} is not one of {sorted(STORAGE_DTYPES)}")
    if rank < 1 or clusters < 1 or iters < 0:
        raise CompressError(f"rank and clusters must be >= 1 and iters >= 0, got {rank}, {clusters}, {iters}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CompressError(f"{out_dir} exists and is not empty: give a new or empty directory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = compute_dtype or (torch.float32 if device.type == "cuda" else torch.float64)
    dims = dims or infer_dims(src_dir)
    adapters = open_collection(src_dir, dims, max_rank, progress)
    if clusters > len(adapters):
        raise CompressError(f"{clusters} clusters for {len(adapters)} adapters: at most one cluster per adapter")
    pairs = [(layer, m) for layer in range(dims.num_hidden_layers) for m in MODULES
             if any(ad.rank(layer, m) for ad in adapters)]
    modules = {m: dims.module_io(m) for m in MODULES if any(p[1] == m for p in pairs)}
    too_small = {m: io for m, io in modules.items() if min(io) < rank}
    if too_small:
        raise CompressError(f"rank {rank} exceeds the smaller dimension of {too_small} (in, out)")
    opts = JointOptions(rank=rank, diagonal=diagonal, iters=iters, device=device, dtype=compute_dtype, seed=seed)

    def stacks(desc: str) -> Iterator[tuple[int, str, ModuleStack]]:
        for layer, module in tqdm(pairs, desc=desc, unit="module", disable=not progress):
            stack = read_module(adapters, layer, module, dims)
            if stack is not None:
                yield layer, module, stack

    labels = _cluster(adapters, stacks("clustering"), clusters, opts) if clusters > 1 else [0] * len(adapters)
    bases: dict[int, dict[str, torch.Tensor]] = {c: {} for c in range(clusters)}
    cores: dict[str, dict[str, torch.Tensor]] = {ad.name: {} for ad in adapters}
    errors: dict[str, dict[str, dict[int, tuple[float, float]]]] = {ad.name: {} for ad in adapters}
    for layer, module, stack in stacks("compressing"):
        for c in range(clusters):
            positions = [j for j, i in enumerate(stack.members) if labels[i] == c]
            if not positions:
                continue
            part = stack if clusters == 1 else stack.select(positions)
            res = compress_module(part, opts, dtype)
            bases[c][tensor_key(layer, module, "U")] = res.u
            bases[c][tensor_key(layer, module, "V")] = res.v
            for j, i in enumerate(part.members):
                name = adapters[i].name
                cores[name][tensor_key(layer, module, "core")] = res.cores[j].clone()
                errors[name].setdefault(module, {})[layer] = (float(res.norms[j]), float(res.errors[j]))
    manifest = Manifest(
        rank=rank, diagonal=diagonal, dtype=storage_names[dtype], num_layers=dims.num_hidden_layers,
        modules=modules,
        clusters=tuple({"bases": bases_path(c), "layers": _layers(bases[c], "U")} for c in range(clusters)),
        adapters={ad.name: {"cluster": labels[i], "cores": cores_path(ad.name),
                            "layers": _layers(cores[ad.name], "core")}
                  for i, ad in enumerate(adapters)})
    os.makedirs(out_dir, exist_ok=True)
    write_collection(out_dir, manifest, bases, cores)
    itemsize = torch.empty((), dtype=dtype).element_size()
    options = {"rank": rank, "clusters": clusters, "diagonal": diagonal, "iters": iters,
               "dtype": storage_names[dtype], "device": str(device), "compute_dtype": str(compute_dtype)}
    report = build_report(
        options, {ad.name: labels[i] for i, ad in enumerate(adapters)}, errors,
        uncompressed_bytes={ad.name: _uncompressed_elems(ad, dims) * itemsize for ad in adapters},
        core_bytes={n: sum(t.numel() for t in ts.values()) * itemsize for n, ts in cores.items()},
        bases_bytes=sum(t.numel() for ts in bases.values() for t in ts.values()) * itemsize,
        source_file_bytes=sum(os.path.getsize(ad.spec.weights_file) for ad in adapters))
    write_report(out_dir, report)
    return report


def _cluster(adapters: list[SourceAdapter], stacks: Iterator[tuple[int, str, ModuleStack]], clusters: int,
             opts: JointOptions) -> list[int]:
    """k-means cluster of each adapter from its sketch features over every (layer, module)."""
    blocks = []
    for index, (_, _, stack) in enumerate(stacks):
        f = sketch_features(stack, opts.seed * 1_000_003 + index, opts.device, opts.dtype)
        full = torch.zeros(len(adapters), f.shape[1], dtype=f.dtype)
        full[list(stack.members)] = f
        blocks.append(full)
    features = torch.cat(blocks, dim=1)
    norms = features.norm(dim=1, keepdim=True)
    features = torch.where(norms > 0, features / norms.clamp_min(1e-300), features)
    return kmeans(features, clusters, opts.seed).tolist()


def _layers(tensors: dict[str, torch.Tensor], what: str) -> dict[str, list[int]]:
    """module -> sorted layers with a `what` tensor, from `tensor_key` names."""
    out: dict[str, list[int]] = {}
    for key in tensors:
        _, layer, module, kind = key.split(".")
        if kind == what:
            out.setdefault(module, []).append(int(layer))
    return {m: sorted(out[m]) for m in MODULES if m in out}


def _uncompressed_elems(adapter: SourceAdapter, dims: ModelDims) -> int:
    """Elements of every A and B of `adapter` at its real per-layer ranks."""
    return sum(r * sum(dims.module_io(m)) for m, ranks in adapter.spec.plan.layer_ranks.items() for r in ranks)
