"""Samples, the order each adapter sees them in, and the mixed micro-batches of a step.

An adapter's order is a pure function of (seed, step): epoch e is a permutation seeded by
(seed, e), and step k takes the k-th `batch_size` slice of the epochs laid end to end. So a
resumed job sees exactly the batches an uninterrupted one would, and the PEFT baseline of the
equivalence test can ask for the same batches without replaying anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels not predicted (transformers' and PEFT's convention)


@dataclass(frozen=True)
class Sample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # same length; IGNORE_INDEX where no loss is taken

    @property
    def num_targets(self) -> int:
        """Tokens this sample contributes to the loss (labels are shifted by one, as in HF)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def load_samples(path: str, vocab_size: int, max_seq_len: int | None = None) -> list[Sample]:
    """One sample per JSONL line: {"input_ids": [...]} and optionally "labels" (default: the
    input ids). ValueError names the file and line of the first bad sample."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(obj, dict) or set(obj) - {"input_ids", "labels"} or "input_ids" not in obj:
                raise ValueError(f"{where}: a sample is an object with input_ids and optionally labels")
            ids, labels = obj["input_ids"], obj.get("labels", obj["input_ids"])
            if not (isinstance(ids, list) and all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)):
                raise ValueError(f"{where}: input_ids must be a list of token ids in [0, {vocab_size})")
            if not (isinstance(labels, list) and len(labels) == len(ids)
                    and all(isinstance(t, int) and (t == IGNORE_INDEX or 0 <= t < vocab_size) for t in labels)):
                raise ValueError(f"{where}: labels must be token ids or {IGNORE_INDEX}, as many as input_ids")
            sample = Sample(tuple(ids[:max_seq_len]), tuple(labels[:max_seq_len]))
            if sample.num_targets < 1:
                raise ValueError(f"{where}: the sample has no token to predict (needs >= 2 tokens and a label)")
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


class AdapterStream:
    """Which samples (indices) an adapter trains on at each step."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool) -> None:
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._epochs:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                self._epochs[e] = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                self._epochs[e] = list(range(self.num_samples))
        return self._epochs[e]

    def batch(self, step: int) -> list[int]:
        """The sample indices of `step` (batches run across epoch boundaries)."""
        first = step * self.batch_size
        return [self._epoch(i // self.num_samples)[i % self.num_samples] for i in range(first, first + self.batch_size)]


@dataclass(frozen=True)
class Row:
    """One sequence of a step: the adapter slot it trains and its sample."""

    slot: int
    sample: Sample


@dataclass
class MicroBatch:
    """Right-padded rows: what one forward/backward takes."""

    input_ids: torch.Tensor       # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor          # int64 [B, L], IGNORE_INDEX at padding
    row_slot: torch.Tensor        # int64 [B]
    token_slot: torch.Tensor      # int32 [B * L], the row's slot, -1 at padding (no LoRA applied)


def micro_batches(rows: list[Row], max_tokens: int, pad_id: int = 0) -> list[MicroBatch]:
    """Rows sorted by length (longest first, stable) and packed greedily into micro-batches of at
    most `max_tokens` padded tokens (a longer row goes alone), so padding stays small."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].sample.input_ids))
    groups: list[list[Row]] = []
    for i in order:
        row = rows[i]
        if groups and (len(groups[-1]) + 1) * len(groups[-1][0].sample.input_ids) <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [_collate(g, pad_id) for g in groups]


def _collate(rows: list[Row], pad_id: int) -> MicroBatch:
    length = max(len(r.sample.input_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    token_slot = torch.full((len(rows), length), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        n = len(r.sample.input_ids)
        ids[i, :n] = torch.tensor(r.sample.input_ids)
        labels[i, :n] = torch.tensor(r.sample.labels)
        mask[i, :n] = 1
        token_slot[i, :n] = r.slot
    return MicroBatch(ids, mask, labels, torch.tensor([r.slot for r in rows]), token_slot.view(-1))
