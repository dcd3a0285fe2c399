"""Report side: metrics from request records, results files, markdown table and PNG plots."""

from __future__ import annotations

import json
import os

import pytest

from bench_results import fake_records, fake_results, fake_row
from slora_plugin.bench.cli import main
from slora_plugin.bench.report import (ReportError, all_rows, load_results, markdown_table, newest_runs, summarize,
                                       write_report, write_results)
from slora_plugin.bench.workload import WorkloadSpec


def test_summarize_numbers():
    m = summarize(fake_records(), duration_s=10.0, slo_ttft_s=5.0)
    assert m["requests"] == m["completed"] == 100
    assert m["req_per_s"] == 10.0 and m["output_tok_per_s"] == 1280.0
    assert m["total_tok_per_s"] == (128 + 256) * 10.0
    assert m["ttft_p50_s"] == pytest.approx(5.05) and m["ttft_p99_s"] == pytest.approx(9.901)
    assert m["tpot_p50_s"] == pytest.approx(0.01495)
    assert m["slo_attainment"] == 0.5          # ttft 0.1 .. 5.0 meet the 5 s SLO
    assert len(m["ttft_quantiles_s"]) == 101 and m["ttft_quantiles_s"][0] == 0.1
    assert m["e2e_quantiles_s"][-1] == pytest.approx(12.0)


def test_summarize_counts_unfinished_as_slo_miss():
    recs = fake_records(finished=40)
    for r in recs[40:]:
        r.update(ttft_s=None, e2e_s=None, tpot_s=None, n_out=0)
    m = summarize(recs, duration_s=4.0, slo_ttft_s=100.0)
    assert m["completed"] == 40 and m["req_per_s"] == 10.0
    assert m["slo_attainment"] == 0.4
    empty = summarize([dict(r, finished=False) for r in recs[40:]], 1.0, 1.0)
    assert empty["ttft_p50_s"] is None and empty["ttft_quantiles_s"] == [] and empty["completed"] == 0
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        summarize(recs, 0, 1.0)


def test_results_file_shape(tmp_path):
    paths = fake_results(tmp_path)
    data = json.load(open(paths[1]))
    assert {"date", "device", "vllm_version", "plugin_version", "command", "workload", "rows"} <= set(data)
    row = data["rows"][0]
    for key in ("system", "n_adapters", "ranks", "req_per_s", "output_tok_per_s", "ttft_p50_s",
                "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "settings", "init_s"):
        assert key in row
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))


def test_markdown_table_and_ratio_to_base(tmp_path):
    table = markdown_table(load_results(fake_results(tmp_path)))
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and ": all-at-once" in ln.split("|")[1]]
    assert len(lines) == 8
    stock1000 = next(ln for ln in lines if "| stock | 1,000 |" in ln)
    assert "| 0.113 |" in stock1000        # 818.9 / 7270.7, as in the baseline's d2 row
    assert "max_loras=128" in stock1000
    gamma = [ln for ln in table.splitlines() if ln.startswith("| ") and ": gamma rate 4 cv 1" in ln.split("|")[1]]
    assert any("| stock | 1,000 |" in ln and "| 0.556 |" in ln for ln in gamma)
    assert "NVIDIA H100 80GB HBM3" in table
    plugin2000 = next(ln for ln in lines if "| plugin | 2,000 |" in ln)
    assert "| 3 | 2,005 / 1,000 | 2,500 of 7,000 |" in plugin2000
    assert "| plugin | 2,000 | 8/16 |" in plugin2000  # the rank mix has its column
    assert "| 3 | - / - | - |" in stock1000      # stock has no pool counters: unknown, not 0


def test_write_report_makes_pngs(tmp_path):
    out = write_report(fake_results(tmp_path), str(tmp_path / "report"))
    for key in ("throughput_plot", "ttft_cdf_plot"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(out[key]) > 10_000
    assert open(out["table"]).read().startswith("| trace | system |")


def test_report_cli_and_errors(tmp_path, capsys):
    fake_results(tmp_path)
    assert main(["report", str(tmp_path / "throughput-*.json"), "--out-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| plugin | 2,000 |" in out and "ttft_cdf_plot:" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"date": "x"}))
    with pytest.raises(ReportError, match="missing top-level key"):
        load_results([str(bad)])
    assert main(["report", str(bad), "--out-dir", str(tmp_path / "r")]) == 2
    assert "missing top-level key" in capsys.readouterr().err
    with pytest.raises(ReportError, match="cannot read"):
        load_results([str(tmp_path / "none.json")])


def test_console_script_report(tmp_path):
    """`slora-plugin bench report` (the installed console script) from another directory."""
    import shutil
    import subprocess
    import sys

    fake_results(tmp_path)
    exe = shutil.which("slora-plugin") or os.path.join(os.path.dirname(sys.executable), "slora-plugin")
    proc = subprocess.run([exe, "bench", "report", str(tmp_path / "throughput-*.json"),
                           "--out-dir", str(tmp_path / "r"), "--name", "h100"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "r")) == ["h100-ttft-cdf.png", "h100-vs-adapters.png", "h100.md"]
    assert "| plugin | 2,000 |" in open(tmp_path / "r" / "h100.md").read()


def test_settings_column_shows_the_plugins_own_settings():
    from slora_plugin.bench.report import _settings

    plugin = {"additional_config": {"slora": {"adapter_dir": "/a", "max_lora_rank": 128,
                                              "target_modules": ["qkv_proj", "o_proj"]}}}
    assert _settings(plugin) == "slora.max_lora_rank=128, slora.target_modules=['qkv_proj', 'o_proj']"
    assert _settings({"max_loras": 128}) == "max_loras=128"
    assert _settings({}) == "-"


def test_rows_compare_within_their_model_and_compressed_runs_are_their_own_system(tmp_path):
    """Two models on one trace shape: each row's 'vs base' is its own model's newest base, a
    compressed run is labelled as such, and the plots take each system's newest run only."""
    spec = WorkloadSpec(n_adapters=100, arrival="all")
    meta = {"device": "H100", "vllm_version": "0.26.0", "plugin_version": "x", "workload": [spec.to_dict()]}

    def write(name, date, model, rows):
        cmd = "python benchmarks/throughput.py" + (f" --model /cfg/{model}/" if model else "")
        return write_results(str(tmp_path / name), dict(meta, date=date, command=cmd), rows)

    compressed = dict(fake_row("plugin", 100, 1500.0, spec), compressed={"rank_k": 128, "clusters": 1})
    paths = [write("throughput-base-1.json", "2026-12-01", None, [fake_row("base", 0, 7000.0, spec)]),
             write("throughput-base-2.json", "2026-12-06", None, [fake_row("base", 0, 8000.0, spec)]),
             write("throughput-base-3.json", "2026-12-06", "llama-3-8b", [fake_row("base", 0, 12000.0, spec)]),
             write("throughput-plugin-1.json", "2026-12-01", None, [fake_row("plugin", 100, 2000.0, spec)]),
             write("throughput-plugin-2.json", "2026-12-06", None, [fake_row("plugin", 100, 4000.0, spec)]),
             write("throughput-plugin-3.json", "2026-12-06", "llama-3-8b", [fake_row("plugin", 100, 6000.0, spec),
                                                                          compressed])]
    table = markdown_table(load_results(paths)).splitlines()

    def line(model, system, tok):
        return next(ln for ln in table if ln.startswith(f"| {model}: all-at-once")
                    and f"| {system} | 100 |" in ln and f"| {tok} |" in ln)

    assert "| 0.500 |" in line("llama-2-7b", "plugin", "4,000.0")      # / 8,000, not / 12,000
    assert "| 0.250 |" in line("llama-2-7b", "plugin", "2,000.0")      # the newest base, 8,000
    assert "| 0.500 |" in line("llama-3-8b", "plugin", "6,000.0")
    assert "| 0.125 |" in line("llama-3-8b", "plugin compressed K=128", "1,500.0")
    drawn = {(r["_shape"].split(":")[0], r["_system"], r["output_tok_per_s"])
             for r in newest_runs(all_rows(load_results(paths)))}
    assert drawn == {("llama-2-7b", "base", 8000.0), ("llama-2-7b", "plugin", 4000.0),
                     ("llama-3-8b", "base", 12000.0), ("llama-3-8b", "plugin", 6000.0),
                     ("llama-3-8b", "plugin compressed K=128", 1500.0)}
