"""benchmarks/finetune_bench.py at a tiny size on the CPU: the result file has the fields the
issue asks for, and in fp32 the mixed batch and PEFT lose the same."""

from __future__ import annotations

import json
import os
import runpy

import pytest

from train_fixtures import MODEL_DIR, REPO, one_thread  # noqa: F401 - fixture

SCRIPT = os.path.join(REPO, "benchmarks", "finetune_bench.py")


@pytest.mark.slow
def test_finetune_bench_smoke(tmp_path, one_thread) -> None:  # noqa: F811
    ns = runpy.run_path(SCRIPT, run_name="finetune_bench")
    assert ns["RESULTS"] == os.path.join(REPO, "benchmarks", "results")
    path = ns["main"](["--config", MODEL_DIR, "--n-adapters", "1,3", "--seqs-per-adapter", "2", "--seq-len", "12",
                       "--rank", "4", "--steps", "2", "--warmup", "1", "--micro-batch-tokens", "24",
                       "--peft-adapters", "2", "--dtype", "float32", "--device", "cpu", "--backend", "torch",
                       "--out", str(tmp_path), "--tag", "cpu"])
    result = json.load(open(path))
    assert os.path.basename(path) == f"finetune-cpu-{result['date']}.json"
    assert result["device"] == "cpu" and [r["n_adapters"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert {"n_adapters", "tokens_per_s", "peft_sequential_tokens_per_s", "max_rel_loss_diff"} <= set(row)
        assert row["tokens_per_s"] > 0 and row["peft_sequential_tokens_per_s"] > 0
        assert row["max_rel_loss_diff"] < 1e-4
    assert [r["peft_adapters_measured"] for r in result["rows"]] == [1, 2]
