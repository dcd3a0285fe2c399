"""Torch CPU threads in a forked worker process.

vLLM forks its engine-core process by default (`VLLM_WORKER_MULTIPROC_METHOD=fork`), and with
one GPU the worker runs inside it. If the parent process has already run a parallel torch CPU op
(e.g. `torch.randn` of a large adapter tensor), the OpenMP thread pool it started does not exist
in the child, yet the child's OpenMP runtime still believes it does: the child's first parallel
CPU op (more than ~32k elements) then waits forever for those threads. Reproduced with torch
2.11 (GNU OpenMP + MKL): parent `torch.randn(4096, 4096)`, fork, child `torch.randn(4096, 4096)`
hangs; with `torch.set_num_threads(1)` first, the child runs (ATen then never opens an OpenMP
region). vLLM does exactly this for its multiprocess GPU workers (`set_multiprocessing_worker_envs`:
1 thread unless OMP_NUM_THREADS is set), but not for the engine core it forks with TP=1.

The plugin's worker does CPU torch work in this process (the host store's loader threads), so it
applies vLLM's worker rule there too, first thing in the worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Mapping

import torch

logger = logging.getLogger(__name__)


def limit_child_torch_threads(environ: Mapping[str, str] | None = None) -> bool:
    """In a child process (forked or spawned) with OMP_NUM_THREADS unset, use one torch CPU
    thread, as vLLM's multiprocess GPU workers do. Returns True if it changed the count.
    The in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) is the user's process: untouched."""
    environ = os.environ if environ is None else environ
    if multiprocessing.parent_process() is None or "OMP_NUM_THREADS" in environ:
        return False
    threads = torch.get_num_threads()
    if threads <= 1:
        return False
    torch.set_num_threads(1)
    logger.info("slora: torch CPU threads %d -> 1 in this worker process (fork safety and no "
                "CPU contention, as vLLM's workers; set OMP_NUM_THREADS to choose)", threads)
    return True
