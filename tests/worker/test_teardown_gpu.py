"""Issue 17: an engine with the plugin and CUDA graphs starts, serves adapters and exits cleanly,
20 times in a row. One of three correctness runs on the H100 (2026-12-05) aborted at exit
(SIGABRT, "terminate called without an active exception", exit -6) after producing correct
tokens. Each run here is its own process doing what that run did (benchmarks/gpu_correctness.py:
the correctness fixture's model and adapters, `LLM(...)` with graphs, one mixed batch) and then
simply ending, so that the engine is torn down as it was there: by the interpreter's exit.
Skipped without a CUDA GPU; `bash benchmarks/gpu_run.sh teardown` runs it (~20 engine starts).

On 2026-12-06 the eager run of `gpu_run.sh compress-correctness` (an adapter directory holding a
compressed collection beside the plain adapters, `enforce_eager`) aborted the same way twice in a
row: `test_engine_restarts_compressed_eager_exit_cleanly` repeats that case
(`gpu_run.sh teardown-compressed`, SLORA_TEARDOWN_COMPRESSED_RUNS runs, default 5)."""

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
COMPRESSED_RUNS = int(os.environ.get("SLORA_TEARDOWN_COMPRESSED_RUNS", "5"))
RUN_TIMEOUT_S = 240

# argv: model dir, adapter dir, "eager" or "graphs", then the adapters' names
CHILD = r"""
import os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

model, adapters, mode, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
llm = LLM(model, dtype="float16", enforce_eager=mode == "eager",
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


def _run(i: int, cwd: str, argv: list[str]) -> tuple[int, int, str]:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=cwd, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
        return i, done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        return i, -1, f"timed out after {RUN_TIMEOUT_S} s: {e.stdout or ''}{e.stderr or ''}"


def _restarts(runs: int, cwd: str, argv: list[str]) -> None:
    """`runs` engines of CHILD, PARALLEL at a time; each must generate and exit 0, never abort."""
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        results = sorted(pool.map(lambda i: _run(i, cwd, argv), range(runs)))
    bad = [(i, rc, out[-6000:]) for i, rc, out in results
           if rc != 0 or "GENERATED" not in out or "terminate called" in out]
    assert not bad, f"{len(bad)} of {runs} runs ended abnormally; first: exit {bad[0][1]}\n{bad[0][2]}"


def test_engine_restarts_with_cuda_graphs_exit_cleanly(tmp_path):
    cwd = str(tmp_path)  # not the repository root: its folders would shadow the installed packages
    adapters = os.path.join(FIXTURE, "adapters")
    _restarts(RUNS, cwd, [os.path.join(FIXTURE, "model"), adapters, "graphs", *sorted(os.listdir(adapters))])


def test_engine_restarts_compressed_eager_exit_cleanly(tmp_path):
    """The fixture's adapters beside a collection compressed from them (K = 50, exact, as
    `gpu_run.sh compress-correctness` makes it), served eagerly: plain and `coll/<name>` in one batch."""
    import shutil

    import torch

    from slora_plugin.adapters.cli import model_dims
    from slora_plugin.compress.api import compress_collection

    model, src = os.path.join(FIXTURE, "model"), os.path.join(FIXTURE, "adapters")
    adapters = str(tmp_path / "adapters")
    shutil.copytree(src, adapters)
    compress_collection(src, os.path.join(adapters, "coll"), 50, dims=model_dims(model), dtype=torch.float16)
    plain = sorted(os.listdir(src))
    _restarts(COMPRESSED_RUNS, str(tmp_path),
              [model, adapters, "eager", *plain, *(f"coll/{n}" for n in plain)])
