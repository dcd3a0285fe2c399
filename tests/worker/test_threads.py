"""Fork safety of torch CPU threads in the worker process (see slora_plugin/worker/threads.py)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from slora_plugin.worker.threads import limit_child_torch_threads


def _child(queue) -> None:
    changed = limit_child_torch_threads(environ={})
    torch.randn(2048, 2048).sum()  # a parallel CPU op: hangs here without the limit
    queue.put((changed, torch.get_num_threads()))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one CPU thread: nothing to hang on")
def test_forked_child_after_parent_openmp_use_runs_parallel_ops():
    torch.randn(2048, 2048).sum()  # the parent starts its OpenMP pool
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung on its first parallel CPU op")
    assert p.exitcode == 0
    assert queue.get(timeout=5) == (True, 1)


def test_the_users_process_and_an_explicit_omp_setting_are_left_alone():
    before = torch.get_num_threads()
    assert limit_child_torch_threads(environ={}) is False  # not a child process
    assert torch.get_num_threads() == before


def _child_with_env(queue) -> None:
    queue.put((limit_child_torch_threads(environ={"OMP_NUM_THREADS": "4"}),
               limit_child_torch_threads(environ={})))


def test_child_respects_omp_num_threads():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_with_env, args=(queue,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    explicit, default = queue.get(timeout=5)
    assert explicit is False
    assert default is (torch.get_num_threads() > 1)
