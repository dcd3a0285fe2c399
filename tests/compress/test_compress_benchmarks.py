"""The compression benchmark scripts run: the kernel benchmark's CPU smoke mode, and the quality
experiment's task data and (slow) a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import runpy

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


@pytest.fixture
def script(monkeypatch):
    """Load a benchmark script as `python benchmarks/NAME` runs it: its folder first on sys.path."""
    monkeypatch.syspath_prepend(BENCH)
    return lambda name: runpy.run_path(os.path.join(BENCH, name), run_name="benchmark_under_test")


def test_kernel_benchmark_smoke_run(tmp_path, capsys, script):
    assert script("bench_compressed.py")["main"](["--tiny", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("compress-kernels-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"paged", "compressed"}
    assert {(r["clusters"], r["distinct_adapters"]) for r in rows if r["op"] == "compressed"} >= {(1, 3), (2, 1)}
    assert "| qkv_proj |" in capsys.readouterr().out


def test_kernel_benchmark_sizes_and_tag(tmp_path, script):
    main = script("bench_compressed.py")["main"]
    assert main(["--tiny", "--out-dir", str(tmp_path), "--tokens", "9", "--distinct", "2,5",
                 "--ranks-k", "4", "--clusters", "1", "--tag", "prefill"]) == 0
    (path,) = tmp_path.glob("compress-kernels-prefill-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["tokens"], r["distinct_adapters"]) for r in rows} == {(9, 2), (9, 5)}
    assert {(r["rank"], r["clusters"]) for r in rows if r["op"] == "compressed"} == {(4, 1)}
    with pytest.raises(SystemExit):
        main(["--tiny", "--out-dir", str(tmp_path), "--tokens", "0"])


def test_quality_task_labels_are_the_mapped_symbols(script):
    ns = script("compress_quality.py")
    perm = torch.randperm(ns["SYMBOLS"], generator=torch.Generator().manual_seed(0))
    task = ns["Task"](0, "t", 100, perm, 4)
    ids, labels = task.batch(3, torch.Generator().manual_seed(1))
    assert ids.shape == (3, 1 + 2 * ns["PAIRS"]) and bool((ids[:, 0] == 1).all())
    x, y = ids[:, 1::2], ids[:, 2::2]
    assert torch.equal(y, 100 + perm[x - 100])
    assert torch.equal(labels[:, 2::2], y) and bool((labels[:, 1::2] == -100).all()) and int(labels[0, 0]) == -100


@pytest.mark.slow
def test_quality_experiment_end_to_end_tiny(tmp_path, capsys, script):
    ns = script("compress_quality.py")
    assert ns["main"](["--adapters", "2", "--steps", "2", "--ks", "2,4", "--out-dir", str(tmp_path / "r"),
                       "--work-dir", str(tmp_path / "w")]) == 0
    (path,) = (tmp_path / "r").glob("compress-quality-cpu-*.json")
    result = json.loads(path.read_text())
    assert [(r["cores"], r["clusters"], r["rank_k"]) for r in result["rows"]] == [
        ("full", 1, 2), ("full", 1, 4), ("diagonal", 1, 4), ("full", 2, 4)]
    assert result["uncompressed"]["max_loss_gap_vs_peft_model"] < 1e-3
    assert "random_rel_error_mean" in result["rows"][0]
    assert "| full | 1 | 2 |" in capsys.readouterr().out
