"""The on-disk format of a compressed collection, and its reader.

A collection directory (`slora-plugin adapters compress SRC OUT`) holds:

  collection.json                    the manifest (below); written last, so a directory
                                     without it is an unfinished write, not a collection
  bases/cluster-0000.safetensors     per cluster c: "layers.{l}.{module}.U" (d_out, K) and
                                     "layers.{l}.{module}.V" (d_in, K), orthonormal columns
  cores/<name>.safetensors           per adapter (nested names keep their folders):
                                     "layers.{l}.{module}.core", (K, K), or (K,) when diagonal
  report.json, report.md             errors and bytes (`compress/report.py`)

An adapter's update of module m in layer l is ΔW = U Σ Vᵀ with U, V of its cluster, scales
folded in (y += U (Σ (Vᵀ x)) is the whole computation). A (layer, module) an adapter does not
adapt has no core (zero). Tensors are in the manifest's `dtype`.

collection.json:
  {"format": "slora-compressed-lora-collection", "version": 1,
   "rank": K, "diagonal": false, "dtype": "float16", "num_layers": L,
   "modules": {"q_proj": [d_in, d_out], ...},          every module some adapter adapts
   "clusters": [{"bases": "bases/cluster-0000.safetensors",
                 "layers": {"q_proj": [0, 1, ...], ...}}],   (layer, module)s with bases
   "adapters": {"<name>": {"cluster": 0, "cores": "cores/<name>.safetensors",
                           "layers": {"q_proj": [0, 1, ...], ...}}}}   ... with a core

Each adapter stays addressable by its name (the `adapters` key; the same names as in the source
directory). Bases are stored once per cluster, however many adapters use them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "slora-compressed-lora-collection"
VERSION = 1
MANIFEST = "collection.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}


def tensor_key(layer: int, module: str, what: str) -> str:
    """Name of a tensor in a bases ("U", "V") or cores ("core") file."""
    return f"layers.{layer}.{module}.{what}"


def bases_path(cluster: int) -> str:
    return f"bases/cluster-{cluster:04d}.safetensors"


def cores_path(name: str) -> str:
    return f"cores/{name}.safetensors"


@dataclass(frozen=True)
class Manifest:
    """collection.json, parsed (see the module docstring)."""

    rank: int
    diagonal: bool
    dtype: str
    num_layers: int
    modules: Mapping[str, tuple[int, int]]
    clusters: tuple[Mapping[str, Any], ...]
    adapters: Mapping[str, Mapping[str, Any]]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "rank": self.rank, "diagonal": self.diagonal,
                "dtype": self.dtype, "num_layers": self.num_layers,
                "modules": {m: list(io) for m, io in self.modules.items()},
                "clusters": list(self.clusters), "adapters": dict(self.adapters)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> "Manifest":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{where}: not a compressed collection of format {FORMAT} version "
                             f"{VERSION} (format {data.get('format')!r}, version {data.get('version')!r})")
        if data.get("dtype") not in STORAGE_DTYPES:
            raise ValueError(f"{where}: dtype {data.get('dtype')!r} is not one of {sorted(STORAGE_DTYPES)}")
        try:
            return cls(rank=int(data["rank"]), diagonal=bool(data["diagonal"]), dtype=str(data["dtype"]),
                       num_layers=int(data["num_layers"]),
                       modules={m: (int(io[0]), int(io[1])) for m, io in data["modules"].items()},
                       clusters=tuple(data["clusters"]), adapters=dict(data["adapters"]))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise ValueError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def write_collection(out_dir: str, manifest: Manifest, bases: Mapping[int, Mapping[str, torch.Tensor]],
                     cores: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write the bases files, the cores files and, last, the manifest into `out_dir`."""
    for c, tensors in bases.items():
        _save(os.path.join(out_dir, bases_path(c)), tensors, {"format": FORMAT, "cluster": str(c)})
    for name, tensors in cores.items():
        _save(os.path.join(out_dir, cores_path(name)), tensors, {"format": FORMAT, "adapter": name})
    write_manifest(out_dir, manifest)


def write_manifest(out_dir: str, manifest: Manifest) -> None:
    """Write collection.json atomically: it marks the directory a finished collection, so it
    comes after every file it names (see the module docstring)."""
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def _save(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


class CompressedCollection:
    """A collection directory, read: the manifest, each cluster's bases and each adapter's cores
    by name, and an adapter's dense ΔW of one (layer, module) (for checks and small models)."""

    def __init__(self, root: str) -> None:
        self.root = root
        path = os.path.join(root, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the manifest of a compressed collection ({e})") from None
        self.manifest = Manifest.from_json(data, path)

    @property
    def names(self) -> list[str]:
        return sorted(self.manifest.adapters)

    def cluster_of(self, name: str) -> int:
        return int(self._entry(name)["cluster"])

    def bases(self, cluster: int) -> dict[str, torch.Tensor]:
        """Every U and V of a cluster, by `tensor_key`."""
        entry = self.manifest.clusters[cluster]
        return _load(os.path.join(self.root, str(entry["bases"])))

    def cores(self, name: str) -> dict[str, torch.Tensor]:
        """Every core of adapter `name`, by `tensor_key`."""
        return _load(os.path.join(self.root, str(self._entry(name)["cores"])))

    def delta(self, name: str, layer: int, module: str) -> torch.Tensor:
        """The dense update U Σ Vᵀ (d_out, d_in) in fp32 of one (layer, module) of `name`
        (zeros where the adapter has no core)."""
        d_in, d_out = self.manifest.modules[module]
        core = self.cores(name).get(tensor_key(layer, module, "core"))
        if core is None:
            return torch.zeros(d_out, d_in)
        bases = self.bases(self.cluster_of(name))
        u = bases[tensor_key(layer, module, "U")].float()
        v = bases[tensor_key(layer, module, "V")].float()
        core = torch.diag(core.float()) if self.manifest.diagonal else core.float()
        return u @ core @ v.T

    def _entry(self, name: str) -> Mapping[str, Any]:
        try:
            return self.manifest.adapters[name]
        except KeyError:
            raise KeyError(f"no adapter {name!r} in the collection {self.root}") from None


def _load(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
