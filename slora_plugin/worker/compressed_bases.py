"""The shared bases of the compressed collections a worker serves, resident on its device.

Compressed adapters (`kernels/compressed_lora.py`) read their cores from KV pages like any
adapter's rows, but their cluster's bases U, V are read by every step that has one of its
adapters, so they stay on the device for the engine's life: one `CompressedBases` per
(layer, module), all resident clusters side by side (`slot_group` picks a cluster's column
block). Built once, before CUDA graphs are captured (the GEMMs' operands are baked into them),
from the collections of the adapter directory (`directory_bases`, at engine start: the worker's
`load_model`, which adds `nbytes` to the model's memory so vLLM's profile takes it from the KV
budget) or from bases read by `adapters/compressed.read_cluster_bases`. No vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import torch

from slora_plugin.adapters.compressed import read_cluster_bases, read_manifest, split_path
from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.compress.collection import MANIFEST, tensor_key
from slora_plugin.kernels.compressed_lora import CompressedBases
from slora_plugin.layout import MODULE_INDEX


@dataclass(frozen=True)
class ResidentBases:
    """`groups[g]`: the (collection, cluster) key of column group g; `by_layer[(layer,
    module id)]`: that (layer, module)'s bases of every group (zeros where a group has none:
    its adapters have zero cores there); `nbytes`: device bytes of all of them."""

    rank: int
    groups: tuple[Hashable, ...]
    by_layer: Mapping[tuple[int, int], CompressedBases]
    nbytes: int

    def group_of(self, key: Hashable) -> int:
        return self.groups.index(key)

    @property
    def max_width(self) -> int:
        return self.rank * len(self.groups)


def resident_bases(groups: Sequence[tuple[Hashable, Mapping[str, torch.Tensor]]],
                   module_io: Mapping[str, tuple[int, int]], num_layers: int, rank: int,
                   dtype: torch.dtype, device: torch.device | str) -> ResidentBases:
    """Each group's bases (`tensor_key` -> U (d_out, K) / V (d_in, K)) on `device` in `dtype`,
    for every (layer, module) of `module_io` (module -> (d_in, d_out)) some group has."""
    by_layer: dict[tuple[int, int], CompressedBases] = {}
    nbytes = 0
    for m, (d_in, d_out) in module_io.items():
        for layer in range(num_layers):
            us, vs, any_group = [], [], False
            for _key, bases in groups:
                u, v = bases.get(tensor_key(layer, m, "U")), bases.get(tensor_key(layer, m, "V"))
                any_group |= u is not None
                us.append(u if u is not None else torch.zeros(d_out, rank))
                vs.append(v if v is not None else torch.zeros(d_in, rank))
            if not any_group:
                continue
            b = CompressedBases.from_clusters([u.to(dtype) for u in us], [v.to(dtype) for v in vs])
            b = CompressedBases(b.v_cat.to(device), b.ut_cat.to(device), rank)
            by_layer[(layer, MODULE_INDEX[m])] = b
            nbytes += (b.v_cat.numel() + b.ut_cat.numel()) * dtype.itemsize
    return ResidentBases(rank, tuple(k for k, _ in groups), by_layer, nbytes)


def directory_bases(adapter_dir: str, num_layers: int, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[ResidentBases, bool] | None:
    """The bases of every (collection, cluster) of `adapter_dir` resident on `device`, and
    whether their cores are diagonal; None when the directory holds no collection (the
    engine then serves exactly as without this feature). The group keys are (collection
    directory, cluster) as `CompressedSpec` names them. All collections must share one rank
    K and one `diagonal` (the core tables have one shape) and agree on module widths."""
    index = AdapterIndex(adapter_dir)
    compressed = sorted(set(index.scan()) - set(index.scan(collections=False)))
    collections: dict[str, str] = {}  # collection directory -> one of its adapters' names
    for name in compressed:
        found = split_path(index.locate(name))
        if found is not None:
            collections.setdefault(found[0], name)
    if not collections:
        return None
    groups: list[tuple[Hashable, Mapping[str, torch.Tensor]]] = []
    module_io: dict[str, tuple[int, int]] = {}
    shape: tuple[int, bool] | None = None
    for collection, name in sorted(collections.items()):
        manifest = read_manifest(collection, name)
        where = os.path.join(collection, MANIFEST)
        if shape is not None and (manifest.rank, manifest.diagonal) != shape:
            raise AdapterError(name, where, f"has rank {manifest.rank} (diagonal "
                                            f"{manifest.diagonal}) but another collection of "
                                            f"{adapter_dir} has rank {shape[0]} (diagonal "
                                            f"{shape[1]}): one engine serves one rank K")
        shape = (manifest.rank, manifest.diagonal)
        for m, io in manifest.modules.items():
            if module_io.setdefault(m, tuple(io)) != tuple(io):
                raise AdapterError(name, where, f"module {m} has widths {tuple(io)}, another "
                                                f"collection {module_io[m]}")
        for cluster in range(len(manifest.clusters)):
            groups.append(((collection, cluster),
                           read_cluster_bases(name, collection, manifest, cluster, dtype)))
    assert shape is not None
    return resident_bases(groups, module_io, num_layers, shape[0], dtype, device), shape[1]
