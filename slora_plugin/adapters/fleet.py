"""Fleets of synthetic adapters: many adapter directories over a few random weight files.

Benchmarks need thousands of valid PEFT adapters. A random file per adapter would take hundreds
of GB for Llama-7B, so the adapters of one *group* share one weights file through hard links;
each is still its own directory, name and lora_int_id to every loader (none of them deduplicates
by inode). `slora-plugin adapters synth` (adapters/cli.py) and the throughput harness
(`slora_plugin.bench.run.prepare_adapters`) both write through `write_fleet`; they differ only in
where a group's file lives:

- in place (`files_dir=None`, `adapters synth`): the group's first adapter holds it, the others
  get an adapter_config.json of their own and a hard link to its weights. Every adapter is
  written anew.
- in `files_dir` (the harness, whose runs share one work directory): each group is a complete
  adapter directory `files_dir/<group>`, written once and kept for later calls, and every adapter
  directory is two hard links to it. An adapter directory already present is kept when it has
  the rank asked for, and is an error otherwise.

A file's weights depend only on its seed, rank, targets, dims and dtype (`write_random_adapter`),
so both layouts write the same bytes for the same adapters. No vLLM: torch and safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, adapter_config, write_random_adapter
from slora_plugin.layout import ModelDims


@dataclass(frozen=True)
class FleetAdapter:
    """One adapter of a fleet: its directory name, rank (alpha is 2 x rank), the seed of its
    weights when its file is written, and its group (adapters of one group share one weights
    file and have one rank; None: a file of its own)."""

    name: str
    rank: int
    seed: int
    group: str | None = None


class FleetError(ValueError):
    """A fleet that cannot be written as asked; the message says why."""


def write_fleet(directory: str, adapters: Sequence[FleetAdapter], dims: ModelDims, targets: Sequence[str],
                dtype: torch.dtype = torch.float16, *, files_dir: str | None = None,
                progress: bool = False) -> list[str]:
    """Write `adapters` under `directory` (see the module docstring for `files_dir`); returns
    their names. `progress`: a tqdm bar over the adapters, or over the group files with
    `files_dir`."""
    from tqdm import tqdm

    targets = list(targets)
    firsts = _groups(adapters, need_group=files_dir is not None)
    os.makedirs(directory, exist_ok=True)
    files: dict[str, str] = {}  # group -> the adapter directory holding its weights file
    if files_dir is not None:
        for group, first in tqdm(firsts.items(), desc="adapter variants", leave=False, disable=not progress):
            path = os.path.join(files_dir, group)
            if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
                write_random_adapter(path, dims, first.rank, targets, seed=first.seed, dtype=dtype)
            files[group] = path
    names = []
    for a in tqdm(adapters, desc="adapters", unit="adapter", disable=not progress or files_dir is not None):
        path = os.path.join(directory, a.name)
        if files_dir is not None:
            if not _kept(path, a.rank):
                os.makedirs(path, exist_ok=True)
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    os.link(os.path.join(files[a.group], name), os.path.join(path, name))
        elif a.group in files:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(adapter_config(a.rank, 2 * a.rank, targets), f, indent=2)
            weights = os.path.join(path, WEIGHTS_NAME)
            if os.path.lexists(weights):
                os.unlink(weights)
            os.link(os.path.join(files[a.group], WEIGHTS_NAME), weights)
        else:
            write_random_adapter(path, dims, a.rank, targets, seed=a.seed, dtype=dtype)
            if a.group is not None:
                files[a.group] = path
        names.append(a.name)
    return names


def _groups(adapters: Sequence[FleetAdapter], need_group: bool) -> dict[str, FleetAdapter]:
    """group -> its first adapter (whose seed the group's file gets), in order of appearance."""
    firsts: dict[str, FleetAdapter] = {}
    for a in adapters:
        if a.group is None:
            if need_group:
                raise FleetError(f"adapter {a.name}: no group, and with files_dir every adapter "
                                 f"links to its group's files")
            continue
        first = firsts.setdefault(a.group, a)
        if first.rank != a.rank:
            raise FleetError(f"group {a.group}: adapter {first.name} has rank {first.rank}, "
                             f"{a.name} rank {a.rank}; a group shares one weights file")
    return firsts


def _kept(path: str, rank: int) -> bool:
    """Whether the adapter directory `path` exists already (with `rank`: FleetError otherwise)."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path, encoding="utf-8") as f:
        have = json.load(f).get("r")
    if have != rank:
        raise FleetError(f"{path} has rank {have}, this run needs {rank}")
    return True
