"""Issue 17: an engine with the plugin and CUDA graphs starts, serves adapters and exits cleanly,
20 times in a row. One of three correctness runs on the H100 (2026-12-05) aborted at exit
(SIGABRT, "terminate called without an active exception", exit -6) after producing correct
tokens. Each run here is its own process doing what that run did (benchmarks/gpu_correctness.py:
the correctness fixture's model and adapters, `LLM(...)` with graphs, one mixed batch) and then
simply ending, so that the engine is torn down as it was there: by the interpreter's exit.
Skipped without a CUDA GPU; `bash benchmarks/gpu_run.sh teardown` runs it (~20 engine starts)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "benchmarks", "fixtures", "correctness")
RUNS = int(os.environ.get("SLORA_TEARDOWN_RUNS", "20"))
#: Engines started side by side (each takes 0.25 of the GPU's memory; side by side, their memory
#: profiling sees each other's allocations, so 1 unless time is short).
PARALLEL = int(os.environ.get("SLORA_TEARDOWN_PARALLEL", "1"))
RUN_TIMEOUT_S = 240

CHILD = r"""
import os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

fixture = sys.argv[1]
adapters = os.path.join(fixture, "adapters")
names = sorted(os.listdir(adapters))
llm = LLM(os.path.join(fixture, "model"), dtype="float16", enforce_eager=False,
          skip_tokenizer_init=True, max_model_len=128, gpu_memory_utilization=0.25, seed=0,
          additional_config={"slora": {"adapter_dir": adapters, "max_lora_rank": 16,
                                       "max_adapters_per_step": 16}})
loras = [None] + [LoRARequest(n, i + 1, os.path.join(adapters, n)) for i, n in enumerate(names)]
out = llm.generate([TokensPrompt(prompt_token_ids=[5 + i, 6, 7, 8]) for i in range(len(loras))],
                   SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False),
                   lora_request=loras)
assert all(len(o.outputs[0].token_ids) == 8 for o in out), out
print("GENERATED", len(out), flush=True)
"""


def _run(i: int, cwd: str) -> tuple[int, int, str]:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, FIXTURE], cwd=cwd, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
        return i, done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        return i, -1, f"timed out after {RUN_TIMEOUT_S} s: {e.stdout or ''}{e.stderr or ''}"


def test_engine_restarts_with_cuda_graphs_exit_cleanly(tmp_path):
    cwd = str(tmp_path)  # not the repository root: its folders would shadow the installed packages
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        results = sorted(pool.map(lambda i: _run(i, cwd), range(RUNS)))
    bad = [(i, rc, out[-3000:]) for i, rc, out in results
           if rc != 0 or "GENERATED" not in out or "terminate called" in out]
    assert not bad, f"{len(bad)} of {RUNS} runs ended abnormally; first: exit {bad[0][1]}\n{bad[0][2]}"
