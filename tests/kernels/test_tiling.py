"""The tile configs: the decode variant's K split as a function of the step's work items (the
host mirror of what both kernels compute on the device), and the tuning constants' table."""

from __future__ import annotations

import re
from pathlib import Path

from slora_plugin.kernels import tiling
from slora_plugin.kernels.tiling import decode_config

MAX_RANK = 128


def test_decode_split_rule() -> None:
    """The decode K split is 16 only where tasks are truly missing: clamp(32 // items, 2, 16)."""
    config = decode_config(4096, MAX_RANK)
    assert [config.split_for(n) for n in (0, 1, 2, 3, 4, 8, 15, 16, 64, 272)] == [16, 16, 16, 10, 8, 4, 2, 2, 2, 2]
    assert config.max_split == 16


def test_large_batches_with_few_tokens_per_adapter_keep_the_decode_tiles() -> None:
    """Up to DECODE_MAX_TOKENS (CUDA graphs) always decode; past it, decode only while the
    tokens per distinct adapter average at most one decode tile, else (or unknown) prefill."""
    decode, prefill = decode_config(4096, MAX_RANK), tiling.prefill_config(4096, MAX_RANK)
    choose = tiling.choose_config
    assert choose(512, 4096, MAX_RANK) == decode and choose(512, 4096, MAX_RANK, adapters=1) == decode
    assert choose(513, 4096, MAX_RANK) == prefill                        # adapters unknown
    assert choose(609, 4096, MAX_RANK, adapters=82) == decode            # ~7 tokens per adapter
    assert choose(16 * 40, 4096, MAX_RANK, adapters=40) == decode        # exactly one tile each
    assert choose(16 * 40 + 1, 4096, MAX_RANK, adapters=40) == prefill
    assert choose(16384, 4096, MAX_RANK, adapters=64) == prefill         # long prompts
    assert choose(1024, 4096, MAX_RANK, adapters=0) == prefill           # no adapter: nothing to tile


def test_every_tuning_constant_is_tabled_in_notes() -> None:
    """kernels/NOTES.md's "Tuning constants" table names every measured number of tiling.py with
    its value: a retuned constant must say where its new value was measured."""
    notes = (Path(__file__).resolve().parents[2] / "kernels" / "NOTES.md").read_text()
    tabled = {name: int(value) for name, value in re.findall(r"^\| `(\w+)` \| (\d+) \|", notes, re.M)}
    constants = {name: value for name, value in vars(tiling).items()
                 if re.fullmatch(r"(DECODE|PREFILL)_[A-Z_]+", name)}
    assert tabled == constants
