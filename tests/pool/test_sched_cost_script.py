"""benchmarks/sched_cost.py runs end to end on a small case and records what it measured."""

from __future__ import annotations

import json
import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sched_cost_small_run_writes_its_rows(tmp_path):
    script = runpy.run_path(os.path.join(REPO, "benchmarks", "sched_cost.py"), run_name="sched_cost")
    out = tmp_path / "cost.json"
    argv = ["--adapters", "3", "--pools", "partly-full", "--systems", "stock-lora,plugin",
            "--max-steps", "4", "--repeats", "1", "--out", str(out), "--label", "t"]
    assert script["main"](argv) == 0
    assert script["main"]([*argv, "--append"]) == 0
    result = json.loads(out.read_text())
    assert [run["label"] for run in result["runs"]] == ["t", "t"]
    rows = {row["system"]: row for row in result["runs"][0]["rows"]}
    assert set(rows) == {"stock-lora", "plugin"}
    for row in rows.values():
        assert row["steps"] == 4 and row["long_queue_steps"] == 4
        assert 0 <= row["ms_outside_vllm_long_queue_median"] <= row["ms_per_step_long_queue_median"]
    assert rows["stock-lora"]["ms_outside_vllm_long_queue_median"] < 0.5  # vLLM's own class only
    assert rows["plugin"]["pool"] == "partly-full" and rows["plugin"]["pool_stats"]["adapter_loads"] == 3
