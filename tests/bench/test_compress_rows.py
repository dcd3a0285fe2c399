"""compress-*.json from throughput results files (`bench.compress_rows`, benchmarks/compress_results.py)."""

from __future__ import annotations

import json
import os
import runpy

import pytest

from slora_plugin.bench.compress_rows import ROW_KEYS, compress_rows
from slora_plugin.bench.command import model_name
from slora_plugin.bench.report import write_results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WL = {"arrival": "all", "rate": 0.0, "cv": 1.0, "num_requests": 1000, "input_len": [256, 256], "output_len": [128, 128]}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _row(system, n, tok, compressed=None, modules=QKVO):
    row = {"system": system, "trace": f"n{n}-all-at-once-1000req", "workload": {**WL, "n_adapters": n},
           "n_adapters": n, "ranks": [] if system == "base" else [8, 128], "req_per_s": 1.0,
           "output_tok_per_s": tok, "ttft_p50_s": 1, "ttft_p99_s": 1, "tpot_p50_s": 1, "tpot_p99_s": 1,
           "settings": {}, "init_s": 1, "adapter_modules": [] if system == "base" else modules}
    if compressed:
        row["compressed"] = {"rank_k": 128, "clusters": 1, "rel_error_mean": 0.9, "rel_error_max": 0.95}
    return row


def _file(tmp_path, name, date, command, rows, device="H200"):
    meta = {"date": date, "device": device, "vllm_version": "0.26.0", "plugin_version": "x",
            "command": command, "workload": []}
    return write_results(str(tmp_path / name), meta, rows)


def test_compressed_rows_beside_plain_and_base(tmp_path):
    files = [
        _file(tmp_path, "b.json", "2026-12-06T00:01", "throughput.py --system base", [_row("base", 0, 7000)]),
        _file(tmp_path, "p.json", "2026-12-06T00:05", "throughput.py --system plugin",
              [_row("plugin", 100, 4000), _row("plugin", 1000, 3000)]),
        _file(tmp_path, "c.json", "2026-12-06T00:09", "throughput.py --system plugin --compress-rank 128",
              [_row("plugin", 100, 6500, True), _row("plugin", 1000, 6000, True)]),
        # another model's base must not be taken
        _file(tmp_path, "g.json", "2026-12-06T00:10", "throughput.py --system base --model /dev/shm/llama3-8b",
              [_row("base", 0, 11000)]),
    ]
    result = compress_rows(files)
    assert result["device"] == "H200"
    got = [(r["n_adapters"], r["output_tok_per_s"], r["base_output_tok_per_s"], r["uncompressed_output_tok_per_s"],
            r["of_base"]) for r in result["rows"]]
    assert got == [(100, 6500, 7000, 4000, 0.929), (1000, 6000, 7000, 3000, 0.857)]
    assert all(tuple(r) == ROW_KEYS for r in result["rows"])
    assert result["rows"][0]["workload"].startswith("llama-2-7b, q_proj,k_proj,v_proj,o_proj, ranks 8-128")

    out = tmp_path / "compress.json"
    ns = runpy.run_path(os.path.join(REPO, "benchmarks", "compress_results.py"), run_name="x")
    assert ns["main"]([*files, "--out", str(out)]) == 0
    assert json.load(open(out))["rows"] == result["rows"]
    assert ns["main"]([files[0], "--out", str(out)]) == 2          # no compressed rows


def test_refuses_mixed_devices_and_missing_base(tmp_path):
    c = _file(tmp_path, "c.json", "2026-12-06T00:09", "x --compress-rank 8", [_row("plugin", 100, 1, True)])
    with pytest.raises(ValueError, match="no base row"):
        compress_rows([c])
    b = _file(tmp_path, "b.json", "2026-12-06T00:01", "x", [_row("base", 0, 7000)], device="H100")
    with pytest.raises(ValueError, match="2 devices"):
        compress_rows([b, c])
    assert model_name("a --model=/x/llama3-8b/ --b") == "llama3-8b" and model_name("a") == "llama-2-7b"
