"""Adapters out in PEFT's format, atomically, into a directory the plugin serves.

PEFT's `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors` whose keys
are "base_model.model.<module>.lora_A.weight" (A, [r, in]) and "...lora_B.weight" (B, [out, r]),
with `target_modules` the full names of the wrapped layers (PEFT 0.21 resolves "all-linear" the
same way). The directory is written under a hidden temporary name in the same parent (the
plugin's index skips names starting with ".") and renamed into place, so a running server sees
either no adapter or the whole adapter, never a partial file. Replacing an existing adapter of the
same name takes two renames (old out, new in): for that instant the name is absent, not partial.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping, Sequence

import torch

from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, adapter_config, write_adapter
from slora_plugin.train.bank import AdapterBank, AdapterShape


def lora_key(module: str, which: str) -> str:
    """PEFT's saved key of one layer's A or B."""
    return f"base_model.model.{module}.lora_{which}.weight"


def adapter_tensors(bank: AdapterBank, slot: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's keys: copies on the CPU in `dtype` (never views of the
    masters, which the next optimizer step changes)."""
    out = {}
    for p in bank.placements[slot]:
        out[lora_key(p.module, "A")] = bank.a_matrix(p).to("cpu", dtype, copy=True)
        out[lora_key(p.module, "B")] = bank.bt_matrix(p).t().to("cpu", dtype, copy=True).contiguous()
    return out


def peft_config(shape: AdapterShape, base_model: str) -> dict:
    """The adapter_config.json of a trained adapter (LoRA without dropout, bias or rsLoRA)."""
    return adapter_config(shape.rank, shape.alpha, sorted(shape.modules), base_model=base_model)


def write_adapter_atomic(output_dir: str, name: str, config: Mapping[str, object],
                         tensors: Mapping[str, torch.Tensor]) -> str:
    """Write adapter `name` (may be nested, "org/x") under `output_dir`; returns its path."""
    final = os.path.join(output_dir, *name.split("/"))
    parent, leaf = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{leaf}.tmp-", dir=parent)
    old = None
    try:
        write_adapter(tmp, config, tensors)
        _publishable(tmp, (CONFIG_NAME, WEIGHTS_NAME))
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=f".{leaf}.old-", dir=parent)
            os.rename(final, os.path.join(old, leaf))
        os.rename(tmp, final)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(final):  # put the previous adapter back
            os.rename(os.path.join(old, leaf), final)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publishable(directory: str, names: Sequence[str]) -> None:
    """Before the rename publishes it: the usual permissions (mkdtemp makes 0700, and the server
    may run as another user) and the data on disk (a crash must not leave a named, empty file)."""
    umask = os.umask(0)
    os.umask(umask)
    for n in names:
        os.chmod(os.path.join(directory, n), 0o666 & ~umask)
        _fsync(os.path.join(directory, n))
    os.chmod(directory, 0o777 & ~umask)
    _fsync(directory)
