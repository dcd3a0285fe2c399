"""Adapters of compressed collections in the adapter directory (host side, no vLLM).

A sub-directory holding `collection.json` (`slora_plugin/compress/collection.py` is the format)
is a collection: its adapters are named `<collection>/<adapter>` (the adapter's own name in the
manifest may be nested, `<collection>/org/a`), and a directory mixes collections and plain
adapters freely. Such an adapter has no directory of its own: its "path" is the collection's real
directory joined with its name, a key that is unique and that `split_path` maps back.

What the host gives for one:
  - `CompressedSpec` (config level: the manifest and two stats, no tensor read): its page need
    from `core_layout.plan_cores` over the modules it adapts, so the scheduler's page accounting
    (`spec(name).num_pages`) works unchanged;
  - its host form (`read_cores`, which the host cache calls in its loader threads, into pinned
    memory, like a plain adapter's raw form): its cores, one record per layer, already placed as
    they go into its KV pages ((num_layers, num_pages, page_elems) in the serving dtype: a plain
    row copy writes them);
  - its cluster's bases (`read_cluster_bases`), which the worker holds on the device from the
    engine's start (`worker/compressed_bases.py`), and `CollectionBases`, which reads them once
    per collection and cluster for the command-line check.
Every error is an `AdapterError` naming the adapter, the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors import safe_open

from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError
from slora_plugin.adapters.loader import rows_not_finite
from slora_plugin.adapters.spec import StatKey, stat_key
from slora_plugin.compress.collection import MANIFEST, Manifest, tensor_key
from slora_plugin.core_layout import CoreLayout, pack_cores, plan_cores
from slora_plugin.layout import MODULE_INDEX, LayoutError, ModelDims


def collection_root(directory: str) -> bool:
    """Whether `directory` is a compressed collection (holds its manifest)."""
    return os.path.isfile(os.path.join(directory, MANIFEST))


def find_in(root: str, parts: list[str]) -> tuple[str, str] | None:
    """(collection directory, adapter name in it) when some leading components of the checked
    name `parts` lead, from `root`, to a collection and the rest is non-empty; else None.
    The collection directory is not resolved here (the caller confines it)."""
    for i in range(1, len(parts)):
        directory = os.path.join(root, *parts[:i])
        if collection_root(directory):
            return directory, "/".join(parts[i:])
    return None


def split_path(path: str) -> tuple[str, str] | None:
    """(collection directory, adapter name) of a compressed adapter's path (see the module
    docstring), or None when no ancestor of `path` is a collection."""
    head, tail = os.path.split(os.path.normpath(path))
    rest = [tail]
    while head and tail:
        if collection_root(head):
            return head, "/".join(reversed(rest))
        head, tail = os.path.split(head)
        rest.append(tail)
    return None


#: Parsed manifests by path, with the stat they were read at. A collection of 1,000 adapters has a
#: manifest of ~1.4 MB that took ~18 ms to parse on a CI core, and every adapter's first spec
#: needs it: parsed once per change instead of once per adapter (H100, 1,000 compressed adapters
#: at once: the scheduler parsed it ~600 times on the engine's thread).
_manifests: dict[str, tuple[StatKey, Manifest]] = {}
_manifests_lock = threading.Lock()


def read_manifest(collection: str, adapter: str) -> Manifest:
    """The parsed manifest of `collection` (parsed again only when its file changed);
    AdapterError naming `adapter` and the file."""
    path = os.path.join(collection, MANIFEST)
    stamp = stat_key(path)
    with _manifests_lock:
        cached = _manifests.get(path)
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        manifest = Manifest.from_json(data, path)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise AdapterError(adapter, path, f"cannot be read as a compressed collection ({e})") from None
    if stamp is not None and stat_key(path) == stamp:  # not replaced while it was being read
        with _manifests_lock:
            _manifests[path] = (stamp, manifest)
    return manifest


def member_names(collection: str, prefix: str) -> list[str]:
    """`prefix/<adapter>` for each adapter of the collection's manifest (for `AdapterIndex.scan`)."""
    manifest = read_manifest(collection, prefix)
    return [f"{prefix}/{a}" for a in manifest.adapters]


@dataclass(frozen=True, eq=False)
class CompressedSpec:
    """One adapter of a compressed collection (config level). The attributes the scheduler and
    the store's bookkeeping read (`name`, `path`, `content_id`, `num_pages`) mean what they mean
    on `AdapterSpec`; `ranks` is 0 everywhere (no paged rows), `modules` what it adapts."""

    name: str
    path: str
    collection: str
    member: str
    cluster: int
    modules: tuple[str, ...]
    layers: Mapping[str, tuple[int, ...]]
    content_id: str
    layout: CoreLayout
    manifest: Manifest

    @property
    def num_pages(self) -> int:
        return self.layout.num_pages

    @property
    def ranks(self) -> Mapping[str, int]:
        return {}

    @property
    def cores_file(self) -> str:
        return os.path.join(self.collection, str(self.manifest.adapters[self.member]["cores"]))

    @property
    def bases_file(self) -> str:
        return os.path.join(self.collection, str(self.manifest.clusters[self.cluster]["bases"]))


def compressed_key(collection: str, member: str) -> tuple[StatKey | None, StatKey | None]:
    """What must stay equal for a cached compressed spec or error to still be valid: the
    manifest's stat and the adapter's cores file's stat (found by its conventional place;
    a manifest that points elsewhere is re-read when the manifest changes, which it must)."""
    return (stat_key(os.path.join(collection, MANIFEST)),
            stat_key(os.path.join(collection, "cores", member + ".safetensors")))


def build_compressed_spec(name: str, path: str, collection: str, member: str, dims: ModelDims,
                          page_elems: int) -> CompressedSpec:
    """Validate a compressed adapter against the served model and place its cores in pages."""
    manifest = read_manifest(collection, name)
    where = os.path.join(collection, MANIFEST)
    entry = manifest.adapters.get(member)
    if entry is None:
        raise AdapterNotFoundError(name, where, f"the collection has no adapter {member!r}")
    if manifest.num_layers != dims.num_hidden_layers:
        raise AdapterError(name, where, f"the collection was compressed for {manifest.num_layers} "
                                        f"layers; the served model has {dims.num_hidden_layers}")
    for m, (d_in, d_out) in manifest.modules.items():
        if m not in MODULE_INDEX:
            raise AdapterError(name, where, f"unknown module {m!r}")
        if (d_in, d_out) != dims.module_io(m):
            raise AdapterError(name, where, f"{m} is {d_in} -> {d_out} in the collection, "
                                            f"{dims.module_io(m)[0]} -> {dims.module_io(m)[1]} "
                                            f"in the served model")
    try:
        cluster = int(entry["cluster"])
        manifest.clusters[cluster]["bases"]
        layers = {str(m): tuple(int(i) for i in ls) for m, ls in dict(entry["layers"]).items()}
        str(entry["cores"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise AdapterError(name, where, f"malformed entry for {member!r} "
                                        f"({type(e).__name__}: {e})") from None
    root = os.path.realpath(collection)
    for what, rel in (("cores", str(entry["cores"])),
                      ("bases", str(manifest.clusters[cluster]["bases"]))):
        real = os.path.realpath(os.path.join(collection, rel))
        if not real.startswith(root + os.sep):
            raise AdapterError(name, where, f"the {what} file of {member!r} ({rel}) leads outside "
                                            f"the collection {root}")
    for m, ls in layers.items():
        if m not in manifest.modules:
            raise AdapterError(name, where, f"{member!r} adapts {m}, which is not among the "
                                            f"collection's modules")
        bad = [i for i in ls if not 0 <= i < manifest.num_layers]
        if bad:
            raise AdapterError(name, where, f"{member!r} has {m} cores for layers {bad}, outside "
                                            f"0..{manifest.num_layers - 1}")
    modules = tuple(sorted((m for m, ls in layers.items() if ls), key=MODULE_INDEX.__getitem__))
    try:
        layout = plan_cores(modules, manifest.rank, manifest.diagonal, page_elems)
    except LayoutError as e:
        raise AdapterError(name, where, f"cannot be laid out in pages: {e}") from None
    digest = hashlib.sha1(repr((path, compressed_key(collection, member))).encode())
    return CompressedSpec(name=name, path=path, collection=collection, member=member,
                          cluster=cluster, modules=modules, layers=layers,
                          content_id=digest.hexdigest()[:16], layout=layout, manifest=manifest)


class CollectionBases:
    """Each (collection, cluster)'s bases, read once and kept (in the serving dtype) while the
    collection's manifest is unchanged. Thread-safe; a read in progress is not repeated."""

    def __init__(self, dims: ModelDims, dtype: torch.dtype) -> None:
        self.dims, self.dtype = dims, dtype
        self._cache: dict[tuple[str, int], tuple[Any, dict[str, torch.Tensor]]] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()
        #: How many bases files were read (a test checks it is once per collection and cluster).
        self.reads = 0

    def get(self, spec: CompressedSpec) -> dict[str, torch.Tensor]:
        key = (spec.collection, spec.cluster)
        stamp = stat_key(os.path.join(spec.collection, MANIFEST))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            bases = self._read(spec)
            with self._lock:
                self._cache[key] = (stamp, bases)
                self.reads += 1
            return bases

    def _read(self, spec: CompressedSpec) -> dict[str, torch.Tensor]:
        return read_cluster_bases(spec.name, spec.collection, spec.manifest, spec.cluster,
                                  self.dtype)


def read_cluster_bases(name: str, collection: str, manifest: Manifest, cluster: int,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every U and V the manifest's entry for `cluster` lists, shape-checked, in `dtype`
    (errors name `name`: the adapter, or the collection when read for the whole of it)."""
    entry = manifest.clusters[cluster]
    path, k = os.path.join(collection, str(entry["bases"])), manifest.rank
    tensors = _read_file(name, path)
    out: dict[str, torch.Tensor] = {}
    for m, layers in dict(entry.get("layers", {})).items():
        d_in, d_out = manifest.modules[m]
        for layer in layers:
            for what, shape in (("U", (d_out, k)), ("V", (d_in, k))):
                key = tensor_key(int(layer), m, what)
                out[key] = _checked(tensors, key, shape, name, path).to(dtype)
    return out


def core_bytes(spec: CompressedSpec, dtype: torch.dtype) -> int:
    """Host bytes of the adapter's cores in page form (what `read_cores` fills)."""
    return spec.manifest.num_layers * spec.layout.num_pages * spec.layout.page_elems * dtype.itemsize


def read_cores(spec: CompressedSpec, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The adapter's host form: (num_layers, num_pages, page_elems) in `dtype`, layer l's cores
    placed by `spec.layout` (zeros wherever it has no core), written into `out` when given (the
    host cache's pinned block). Every core the manifest lists must be there with its shape and
    be finite in `dtype` (one check over the result; the first bad core is then named)."""
    path, k = spec.cores_file, spec.manifest.rank
    tensors = _read_file(spec.name, path)
    shape = (k,) if spec.manifest.diagonal else (k, k)
    want = (spec.manifest.num_layers, spec.layout.num_pages, spec.layout.page_elems)
    if out is None:
        out = torch.empty(want, dtype=dtype)
    elif tuple(out.shape) != want or out.dtype != dtype:
        raise ValueError(f"out must be {want} of {dtype}, got {tuple(out.shape)} of {out.dtype}")
    out.zero_()  # a page's tail past its last row is never written below
    adapted = {m: frozenset(spec.layers[m]) for m in spec.modules}
    for layer in range(spec.manifest.num_layers):
        cores = {m: _checked(tensors, tensor_key(layer, m, "core"), shape, spec.name, path,
                             " (the manifest lists it)")
                 for m in spec.modules if layer in adapted[m]}
        pack_cores(spec.layout, cores, out[layer])
    bad_layers = rows_not_finite(out.view(out.shape[0], -1))
    if bad_layers:  # name the first bad layer's first module whose core is not finite in dtype
        layer = bad_layers[0]
        keys = [tensor_key(layer, m, "core") for m in spec.modules if layer in adapted[m]]
        key = next(k for k in keys if not bool(torch.isfinite(tensors[k].to(dtype)).all()))
        raise AdapterError(spec.name, path, f"{key} has non-finite values (in {dtype})")
    return out


def _checked(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], adapter: str, path: str,
             missing_note: str = "") -> torch.Tensor:
    """tensors[key], which must exist and have `shape` (AdapterError naming the adapter and file)."""
    t = tensors.get(key)
    if t is None:
        raise AdapterError(adapter, path, f"{key} is missing{missing_note}")
    if tuple(t.shape) != shape:
        raise AdapterError(adapter, path, f"{key} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _read_file(adapter: str, path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise AdapterError(adapter, path, "not found") from None
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise AdapterError(adapter, path, f"cannot be read ({type(e).__name__}: {e})") from None
