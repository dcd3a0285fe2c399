"""Shared by the training tests: the fixture model with real weights, random token data, a job."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: A 2-layer Llama (hidden 256, GQA 4/2 heads, vocab 1,000) with real weights.
MODEL_DIR = os.path.join(REPO, "benchmarks", "fixtures", "correctness", "model")
VOCAB = 1000


def write_data(path: str, num: int, seed: int, min_len: int = 5, max_len: int = 20) -> str:
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num):
            n = rnd.randint(min_len, max_len)
            f.write(json.dumps({"input_ids": [rnd.randrange(VOCAB) for _ in range(n)]}) + "\n")
    return path


def write_job(directory: str, adapters: list[dict[str, Any]], **job: Any) -> str:
    """A job file in `directory` (fp32 on the CPU unless overridden); each adapter gets 12 samples."""
    for i, a in enumerate(adapters):
        data_file = a["name"].replace("/", "_") + ".jsonl"
        a.setdefault("data", os.path.basename(write_data(os.path.join(directory, data_file), 12, i)))
    body = {"base_model": MODEL_DIR, "output_dir": "out", "dtype": "float32", "device": "cpu", **job,
            "adapters": adapters}
    path = os.path.join(directory, "job.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f)
    return path


@pytest.fixture
def one_thread():
    """The CPU tests run one torch thread: on a shared 2-core machine more threads spin against
    each other (10x slower steps measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
