"""The scripts in benchmarks/ work from any directory against the installed package: they add
nothing to sys.path (the repository root would shadow the installed `slora_plugin` and make
transformers' probe of the PyPI package `kernels` import ours), they default to their own
folder's results/, and they do nothing when imported as `__mp_main__` (vLLM's spawned engine
core imports the parent's main script under that name)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

from bench_results import fake_results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(REPO, "benchmarks", name) for name in ("throughput.py", "report.py", "roofline.py")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_is_spawn_safe_and_leaves_sys_path_alone(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--definitely-not-a-flag"])
    before = list(sys.path)
    ns = runpy.run_path(script, run_name="__mp_main__")   # would SystemExit if it parsed argv
    assert sys.path == before
    assert ns["RESULTS"] == os.path.join(REPO, "benchmarks", "results")


def test_report_script_from_another_directory(tmp_path):
    paths = fake_results(tmp_path)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, SCRIPTS[1], *paths, "--out-dir", str(tmp_path / "r")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "r")) == [
        "throughput-ttft-cdf.png", "throughput-vs-adapters.png", "throughput.md"]
    assert not os.path.exists(elsewhere / "benchmarks")
    assert "| plugin | 2,000 |" in proc.stdout


def test_report_defaults_to_the_given_results_dir(tmp_path, capsys):
    from slora_plugin.bench.cli import main

    fake_results(tmp_path)
    assert main(["report"], results_dir=str(tmp_path)) == 0
    assert (tmp_path / "throughput.md").is_file() and "| plugin | 2,000 |" in capsys.readouterr().out


def _gpu_run_steps() -> dict[str, list[str]]:
    """step -> the arguments benchmarks/gpu_run.sh gives throughput.py for it."""
    import re
    import shlex

    text = open(os.path.join(REPO, "benchmarks", "gpu_run.sh")).read().replace("\\\n", " ")
    shape = re.search(r'slora_trace\(\) \{[^\n]*\n\s+echo "([^"]+)"', text).group(1)
    text = re.sub(r'"\$\(slora_trace (\S+) (\S+)\)"',
                  lambda m: "'" + shape.replace("$1", m.group(1)).replace("$2", m.group(2)) + "'", text)
    gqa = re.search(r'\nGQA=\((.*?)\)\n', text, re.S).group(1)
    text = text.replace('"${GQA[@]}"', " ".join(gqa.split())).replace('"${SLORA_COMPRESS_RANK:-128}"', "128")
    text = text.replace('"$REPO/benchmarks/configs/llama-3-8b"', "REPO/benchmarks/configs/llama-3-8b")
    helper = re.search(r'benchmarks/throughput.py" (.*?) "\$@"', text).group(1)
    step = re.compile(r'\n\s+(throughput-[a-z0-9-]+)\)\s+(?:#[^\n]*\n\s+)?throughput "\$s" ([^;]*);;')
    steps = {m.group(1): shlex.split(helper.replace('"$RES"', "RES")) + shlex.split(m.group(2))
             for m in step.finditer(text)}
    assert set(steps) == {"throughput-plugin", "throughput-stock", "throughput-base",
                          "throughput-admission", "throughput-stock-gamma", "throughput-s1-base",
                          "throughput-s1-plugin",
                          "throughput-s1-stock", "throughput-s2-plugin", "throughput-compressed",
                          "throughput-gqa-base", "throughput-gqa-plugin", "throughput-gqa-compressed",
                          "throughput-gqa-stock"}
    return steps


def test_gpu_run_throughput_steps_parse_to_the_planned_traces():
    import argparse

    from slora_plugin.bench.cli import _add_commands, _traces
    from slora_plugin.bench.run import adapter_plan

    parser = argparse.ArgumentParser()
    _add_commands(parser)
    got, plans = {}, {}
    for step, argv in _gpu_run_steps().items():
        args = parser.parse_args(["run", *argv])
        assert args.deadline_s == 450 and args.out_dir == "RES"
        traces = _traces(args)
        got[step] = (args.system, [(t.spec.arrival, t.spec.n_adapters) for t in traces])
        if step.startswith(("throughput-s1", "throughput-s2")):
            ranks = (8,) if "-s1-" in step else (8, 16, 32, 64)
            assert all((t.spec.rate, t.spec.cv, t.spec.ranks, len(t.requests))
                       == (20.0, 1.0, ranks, 600) for t in traces), step
        if args.system != "base":
            plans.setdefault(args.work_dir, []).append(adapter_plan(traces))
        if "-gqa-" in step:
            assert args.model == "REPO/benchmarks/configs/llama-3-8b", step
            if args.system != "base":
                assert args.work_dir == "/dev/shm/slora-gqa" and args.ranks == "8,16,32,64"
                assert len(args.adapter_modules.split(",")) == 7
        elif args.system == "stock":
            assert (args.max_loras, args.lora_target_modules) == (128, "qkv_proj,o_proj")
        if step == "throughput-gqa-stock":
            assert (args.max_loras, args.lora_target_modules) == (64, "all")
        assert args.compress_rank == (128 if step.endswith("-compressed") else None), step
        if step == "throughput-admission":
            assert json.loads(args.slora_config) == {"adapter_bytes_per_step_budget": 0.5}
    gamma = ("gamma", 1000)
    assert got == {
        "throughput-plugin": ("plugin", [("all", 1), ("all", 100), ("all", 1000), ("all", 2000), gamma]),
        "throughput-stock": ("stock", [("all", 1), ("all", 100), ("all", 1000)]),
        "throughput-base": ("base", [("all", 0), gamma]),
        "throughput-admission": ("plugin", [("all", 1), ("all", 100), ("all", 1000)]),
        "throughput-stock-gamma": ("stock", [gamma]),
        "throughput-s1-base": ("base", [("gamma", 1000)]),
        "throughput-s1-plugin": ("plugin", [("gamma", 100), ("gamma", 1000), ("gamma", 2000)]),
        "throughput-s1-stock": ("stock", [("gamma", 100), ("gamma", 1000), ("gamma", 2000)]),
        "throughput-s2-plugin": ("plugin", [("gamma", 100), ("gamma", 1000), ("gamma", 2000)]),
        "throughput-compressed": ("plugin", [("all", 100), ("all", 1000)]),
        "throughput-gqa-base": ("base", [("all", 0)]),
        "throughput-gqa-plugin": ("plugin", [("all", 100), ("all", 1000)]),
        "throughput-gqa-compressed": ("plugin", [("all", 100), ("all", 1000)]),
        "throughput-gqa-stock": ("stock", [("all", 100), ("all", 1000)]),
    }
    # Steps sharing a work dir (adapters are reused there) give each adapter id the same rank.
    for same_dir in plans.values():
        for plan in same_dir[1:]:
            common = set(plan) & set(same_dir[0])
            assert {g: plan[g][0] for g in common} == {g: same_dir[0][g][0] for g in common}


def _package_imports(path: str) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from slora_plugin... import name` in a file, including the
    imports inside functions (the GPU scripts import lazily, so importing the file alone does
    not check them)."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    return [(node.lineno, node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slora_plugin")
            for alias in node.names]


@pytest.mark.parametrize("script", sorted(
    os.path.join(REPO, "benchmarks", n) for n in os.listdir(os.path.join(REPO, "benchmarks"))
    if n.endswith(".py")), ids=os.path.basename)
def test_every_package_name_a_script_imports_exists(script):
    """A module move must not leave a GPU script importing a name that is gone (it would fail
    only on the GPU machine, after its set-up)."""
    import importlib

    missing = []
    for line, module, name in _package_imports(script):
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found and not _is_submodule(module, name):
            missing.append(f"{os.path.basename(script)}:{line}: from {module} import {name}")
    assert not missing


def _is_submodule(module: str, name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(f"{module}.{name}") is not None
    except ImportError:
        return False
