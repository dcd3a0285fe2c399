"""The shared CPU fixture (tests/vllm_cpu.py) drives vLLM's real schedulers to completion."""

from __future__ import annotations

import pytest

from tiny_model import write_model_config
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.engine import FinishReason
from vllm_cpu import add_requests, create_scheduler, engine_loop, lora, make_request


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_model_config(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_requests_run_to_completion(model_dir, async_scheduling):
    sched = create_scheduler(model_dir, num_blocks=64, async_scheduling=async_scheduling)
    assert isinstance(sched, AsyncScheduler) == async_scheduling
    reqs = add_requests(sched, [
        make_request(40, 5), make_request(17, 3, lora_request=lora(1)),
        make_request(70, 4, lora_request=lora(2)), make_request(1, 6)])
    loop = engine_loop(sched)
    loop.run(max_steps=200)
    done = loop.finished_reasons()
    assert set(done) == {r.request_id for r in reqs}
    assert all(reason == FinishReason.LENGTH for reason, _ in done.values())
    assert [len(r.output_token_ids) for r in reqs] == [5, 3, 4, 6]
    pool = sched.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == 63  # everything back except the null block


def test_prefix_cache_hits_with_the_sha256_hasher(model_dir):
    sched = create_scheduler(model_dir, num_blocks=64)
    first = make_request(64, 2)
    add_requests(sched, [first])
    loop = engine_loop(sched)
    loop.run()
    again = make_request(prompt_token_ids=first.prompt_token_ids, max_tokens=2)
    add_requests(sched, [again])
    out = sched.schedule()
    # 64 prompt tokens = 4 full blocks; the last is recomputed to get logits.
    assert out.num_scheduled_tokens[again.request_id] == 64 - 48


def test_max_loras_gates_distinct_adapters_per_step(model_dir):
    sched = create_scheduler(model_dir, num_blocks=64, max_loras=2)
    add_requests(sched, [make_request(8, 2, lora_request=lora(i)) for i in (1, 2, 3)])
    out = sched.schedule()
    assert len(out.scheduled_new_reqs) == 2
    assert len(sched.skipped_waiting) == 1
