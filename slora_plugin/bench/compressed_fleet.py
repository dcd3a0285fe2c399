"""The harness's compressed fleet: a run's adapters served from one compressed collection.

The harness's N adapters are hard links to a few random weight files, `distinct` per rank (the
fleet's groups, `bench.run.prepare_adapters`). Compressing the N copies jointly would re-read
the same bytes N times and give the same bases, so the *groups* are compressed jointly (the real
compression of the very weights every adapter has), and the collection the engine serves lists
all N adapter names, each name's cores file a hard link to its group's. The engine sees N
distinct adapters, each with its own name, core pages and loads, exactly as for N compressed
adapters of these ranks; each adapter's compression error is its group's.

Random adapters barely compress (the CPU quality experiment in benchmarks/results/README.md):
these rows measure throughput, their errors say how far these particular adapters are from
their compressed form, not what trained adapters would lose.

Layout under `root/compressed-k<K>-c<C>/`: `src/<group>` (hard links to the groups' adapter
directories), `groups/` (the compressed groups: `compress_collection`'s output and report,
reused when it holds exactly these groups at this K and C), `served/<COLLECTION>/` (rebuilt
every run: the engine's adapter directory).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from typing import Mapping

from slora_plugin.compress.collection import CompressedCollection, Manifest, cores_path, write_manifest
from slora_plugin.layout import ModelDims

#: Name of the served collection: adapter `a` is requested as `<COLLECTION>/a`.
COLLECTION = "coll"


@dataclass(frozen=True)
class CompressedFleet:
    """What the runner needs: the engine's adapter directory, the request name prefix, and each
    served adapter's per-module relative errors (its group's, from the compression report)."""

    adapter_dir: str
    rank: int
    clusters: int
    module_errors: Mapping[str, tuple[float, ...]]

    def request_name(self, adapter: str) -> str:
        return f"{COLLECTION}/{adapter}"

    def request_path(self, adapter: str) -> str:
        return os.path.join(self.adapter_dir, COLLECTION, adapter)

    def error_fields(self, adapters: list[str]) -> dict[str, float | int]:
        """`rank_k`, `clusters`, `rel_error_mean`, `rel_error_max` over the (adapter, module)
        pairs of `adapters` (the compression report's statistics, for these adapters)."""
        pairs = [e for a in adapters for e in self.module_errors[a]]
        return {"rank_k": self.rank, "clusters": self.clusters,
                "rel_error_mean": statistics.fmean(pairs) if pairs else 0.0,
                "rel_error_max": max(pairs, default=0.0)}


def prepare_compressed(root: str, groups: Mapping[str, str], files_dir: str, dims: ModelDims,
                       rank: int, clusters: int = 1) -> CompressedFleet:
    """Compress the groups of `groups` (adapter name -> its group, an adapter directory in
    `files_dir`) and serve every adapter of `groups` from one collection (see the module
    docstring)."""
    from slora_plugin.compress.api import compress_collection

    work = os.path.join(root, f"compressed-k{rank}-c{clusters}")
    src, packed = os.path.join(work, "src"), os.path.join(work, "groups")
    needed = sorted(set(groups.values()))
    if not _holds(packed, needed, rank, clusters):
        shutil.rmtree(work, ignore_errors=True)
        for g in needed:
            _link_tree(os.path.join(files_dir, g), os.path.join(src, g))
        print(f"[bench] compressing {len(needed)} adapter groups at rank {rank}, {clusters} cluster(s)",
              flush=True)
        compress_collection(src, packed, rank, clusters=clusters, dims=dims, progress=True)
    report = _report(packed)
    collection = CompressedCollection(packed)
    served_root = os.path.join(work, "served")
    served = os.path.join(served_root, COLLECTION)
    shutil.rmtree(served_root, ignore_errors=True)
    os.makedirs(os.path.join(served, "cores"))
    for entry in collection.manifest.clusters:
        _link(os.path.join(packed, str(entry["bases"])), os.path.join(served, str(entry["bases"])))
    entries = {}
    for name, group in sorted(groups.items()):
        entry = collection.manifest.adapters[group]
        _link(os.path.join(packed, str(entry["cores"])), os.path.join(served, cores_path(name)))
        entries[name] = {**entry, "cores": cores_path(name)}
    m = collection.manifest
    write_manifest(served, Manifest(rank=m.rank, diagonal=m.diagonal, dtype=m.dtype, num_layers=m.num_layers,
                                    modules=m.modules, clusters=m.clusters, adapters=entries))
    errors = {name: tuple(mod["rel_error"] for mod in report["per_adapter"][group]["modules"].values())
              for name, group in groups.items()}
    print(f"[bench] {len(groups)} adapters served as {COLLECTION}/<name> from {served} "
          f"(groups' rel error mean {report['rel_error_mean']:.3f}, max {report['rel_error_max']:.3f})",
          flush=True)
    return CompressedFleet(served_root, rank, clusters, errors)


def _holds(packed: str, groups: list[str], rank: int, clusters: int) -> bool:
    """Whether `packed` is a finished compression of exactly `groups` at this rank and clusters."""
    try:
        m = CompressedCollection(packed).manifest
    except ValueError:
        return False
    return sorted(m.adapters) == groups and m.rank == rank and len(m.clusters) == clusters


def _report(packed: str) -> dict:
    with open(os.path.join(packed, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def _link_tree(src: str, dst: str) -> None:
    """Hard-link every file of the adapter directory `src` into `dst`."""
    os.makedirs(dst)
    for name in os.listdir(src):
        _link(os.path.join(src, name), os.path.join(dst, name))


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.link(src, dst)

