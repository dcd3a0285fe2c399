"""Training state on disk, so a stopped job resumes at its last checkpoint with the same result
as an uninterrupted run: the step, the master weights, every adapter's AdamW moments and step
counts, the schedules. The data order is a function of the step (`data.AdapterStream`) and
nothing after the init is random, so nothing else is needed.

One file, written to a temporary name and renamed over the previous one: a crash while writing
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile

import torch

CHECKPOINT = "checkpoint.pt"
VERSION = 1


def save_checkpoint(state_dir: str, state: dict) -> str:
    """Atomically replace `state_dir/checkpoint.pt` with `state`; returns its path."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, CHECKPOINT)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(state_dir: str) -> dict | None:
    """The saved state, or None when there is none; ValueError for another format version."""
    path = os.path.join(state_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('version')}, this version reads {VERSION}")
    return state
