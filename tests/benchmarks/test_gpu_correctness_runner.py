"""benchmarks/gpu_correctness.py --model-runner: the variable it sets is the one vLLM 0.26 reads
to pick its GPU model runner, the children inherit it, and the V1 results go to their own file."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_correctness",
                                                  os.path.join(REPO, "benchmarks", "gpu_correctness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load_script()


@pytest.mark.parametrize("runner", sorted(gc.RUNNER_ENV))
def test_runner_env_is_what_vllm_reads(tiny_model_dir, cpu_platform, monkeypatch, runner):
    from vllm_cpu import build_vllm_config

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", gc.RUNNER_ENV[runner])
    if runner == "v2" and not torch.cuda.is_available():  # forced V2 is validated, needs Triton
        with pytest.raises(ValueError, match="Model Runner V2 requires Triton"):
            build_vllm_config(tiny_model_dir)
        return
    assert build_vllm_config(tiny_model_dir).use_v2_model_runner == (runner == "v2")


@pytest.mark.parametrize("runner, used, ok", [("v1", "v1", True), ("v1", "v2", False), (None, "v2", True)])
def test_run_records_the_runner_and_names_the_file(tmp_path, monkeypatch, runner, used, ok):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    seen = []

    def child(cmd, env):  # stands in for one `--run-one` engine process
        seen.append(env.get("VLLM_USE_V2_MODEL_RUNNER"))
        assert env["PYTHONFAULTHANDLER"] == "1"  # an abnormal exit prints every thread's stack
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump([{"adapter": "a", "cudagraphs": "--eager" not in cmd, "model_runner": used,
                        "tokens_equal": True}], f)
        return 0

    monkeypatch.setattr(gc.subprocess, "call", child)
    assert gc.run("fixture", str(tmp_path), runner) == (0 if ok else 1)
    assert seen == [gc.RUNNER_ENV.get(runner)] * 2
    name = f"correctness-{runner}-" if runner else "correctness-"
    [path] = [p for p in os.listdir(tmp_path) if p.startswith(name)]
    data = json.loads((tmp_path / path).read_text())
    assert data["model_runner_forced"] == runner and {r["model_runner"] for r in data["rows"]} == {used}
    assert sys.path[0] != os.path.join(REPO, "benchmarks")


def test_rows_written_before_an_abnormal_exit_are_kept(tmp_path, monkeypatch):
    """Issue 17: a run that wrote its rows and then aborted at exit (SIGABRT: -6) fails, but
    its rows are in the result; a stale part file of an interrupted run is not taken."""
    stale = tmp_path / ".correctness-graphs.json"
    stale.write_text(json.dumps([{"adapter": "stale", "tokens_equal": True}]))

    def child(cmd, env):
        eager = "--eager" in cmd
        if eager:
            with open(cmd[cmd.index("--out") + 1], "w") as f:
                json.dump([{"adapter": "a", "cudagraphs": False, "model_runner": "v2", "tokens_equal": True}], f)
        return 0 if not eager else -6

    monkeypatch.setattr(gc.subprocess, "call", child)
    assert gc.run("fixture", str(tmp_path)) == 1
    [path] = [p for p in os.listdir(tmp_path) if p.startswith("correctness-")]
    rows = json.loads((tmp_path / path).read_text())["rows"]
    assert [r["adapter"] for r in rows] == ["*", "a"] and rows[0]["error"] == "exit status -6"
    assert not any(p.startswith(".correctness-") for p in os.listdir(tmp_path))
