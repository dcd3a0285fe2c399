"""The page pool inside vLLM's real schedulers: capacity against stock max_loras slots, the
max_loras ceiling, broken adapters, content-keyed prefix caching, the real adapter store."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from tiny_model import TINY_LLAMA, write_model_config
from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.peft_format import write_random_adapter
from slora_plugin.layout import MODULES, ModelDims, plan_layout
from slora_plugin.pool.commands import commands_of
from slora_plugin.patches.kv_pool import check_kv_cache_config
from slora_plugin.pool.scheduler import (SLoRAAsyncScheduler, SLoRAScheduler,
                                         scheduler_class)
from vllm.v1.engine import FinishReason
from vllm.v1.request import RequestStatus
from vllm_cpu import (add_requests, build_vllm_config, create_scheduler, engine_loop,
                      fake_model_output, lora, make_request)

DIMS = ModelDims.from_hf_config(SimpleNamespace(**TINY_LLAMA))
BOTH = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_model_config(str(tmp_path_factory.mktemp("tiny")))


def layout_pages(ranks: dict[int, dict[str, int]], page_elems: int):
    return lambda lr: (plan_layout(ranks[lr.lora_int_id], DIMS, page_elems).num_pages,
                       f"content-{lr.lora_int_id}")


def distinct_adapters_per_step(loop) -> list[int]:
    counts = []
    while loop.scheduler.has_requests() or loop.in_flight:
        out = loop.step()
        if out is None:
            continue
        reqs = loop.scheduler.requests
        ids = {r.lora_request.lora_int_id for r in out.scheduled_new_reqs if r.lora_request}
        ids |= {reqs[rid].lora_request.lora_int_id for rid in out.num_scheduled_tokens
                if rid in reqs and reqs[rid].lora_request}
        counts.append(len(ids))
        if hasattr(loop.scheduler, "pool_stats"):
            s = loop.scheduler.pool_stats()
            assert s["pages_kv"] + s["pages_adapters"] + s["pages_free"] == s["pages_total"]
            assert s["pages_kv"] >= 0
    return counts


@BOTH
def test_more_adapters_per_step_than_stock_slots_in_the_same_memory(model_dir, async_scheduling):
    """Stock vLLM with max_loras=32 at max rank 16 pads 32 slots to rank 16 in every module;
    give the pool the same memory as KV blocks and it runs far more distinct adapters at once."""
    rng = random.Random(0)
    n = 200
    ranks = {i: {m: rng.choice([8, 16]) for m in rng.choice([("q_proj", "v_proj"), MODULES])}
             for i in range(1, n + 1)}
    stock_kw = dict(num_blocks=1, max_num_seqs=256, max_num_batched_tokens=4096,
                    async_scheduling=async_scheduling)
    kv_blocks = 600
    page_elems = 1024  # 16 tokens x 2 KV heads x 16 head dim x (K, V), float16
    slot_pages = plan_layout({m: 16 for m in MODULES}, DIMS, page_elems).num_pages
    workload = [dict(prompt_len=20, max_tokens=6, lora_request=lora(i)) for i in range(1, n + 1)]

    stock = create_scheduler(model_dir, **{**stock_kw, "num_blocks": kv_blocks}, max_loras=32)
    add_requests(stock, [make_request(**w) for w in workload])
    stock_counts = distinct_adapters_per_step(engine_loop(stock))

    ours = create_scheduler(model_dir, **{**stock_kw, "num_blocks": kv_blocks + 32 * slot_pages},
                            max_loras=128, scheduler_cls=scheduler_class(async_scheduling),
                            scheduler_kwargs={"pages_of": layout_pages(ranks, page_elems)})
    assert ours.page_elems == page_elems
    add_requests(ours, [make_request(**w) for w in workload])
    our_counts = distinct_adapters_per_step(engine_loop(ours))

    assert max(stock_counts) == 32
    assert max(our_counts) > 2 * 32
    assert len(our_counts) < len(stock_counts)


@BOTH
def test_max_loras_is_the_only_per_step_cap(model_dir, async_scheduling):
    """With memory to spare, vLLM's own max_loras check (set to max_adapters_per_step) caps the
    distinct adapters of a step; the rest wait in skipped_waiting and run next."""
    sched = create_scheduler(model_dir, num_blocks=2000, max_num_seqs=256, max_loras=40,
                             max_num_batched_tokens=4096, async_scheduling=async_scheduling,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (3, "c")})
    add_requests(sched, [make_request(16, 4, lora_request=lora(i)) for i in range(1, 101)])
    out = sched.schedule()
    assert len(out.scheduled_new_reqs) == 40 and len(sched.skipped_waiting) == 60
    assert sched.pool_stats()["adapters_resident"] == 40


@BOTH
def test_broken_adapter_fails_only_its_request(model_dir, async_scheduling):
    state = {"broken": False}

    def pages_of(lr):
        if lr.lora_int_id == 2 and state["broken"]:
            raise AdapterError(lr.lora_name, "adapter_model.safetensors", "file was deleted")
        return 2, "c"

    sched = create_scheduler(model_dir, num_blocks=64, async_scheduling=async_scheduling,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": pages_of})
    good = make_request(16, 3, lora_request=lora(1))
    bad = make_request(16, 3, lora_request=lora(2))
    plain = make_request(16, 3)
    add_requests(sched, [bad, good, plain])  # fine at arrival ...
    state["broken"] = True  # ... broken by the time it is admitted
    loop = engine_loop(sched)
    loop.run(max_steps=50)
    reasons = loop.finished_reasons()
    assert reasons[bad.request_id] == (
        FinishReason.ERROR, "adapter 'adapter-2', file adapter_model.safetensors: file was deleted")
    assert bad.status == RequestStatus.FINISHED_ERROR
    assert reasons[good.request_id][0] == reasons[plain.request_id][0] == FinishReason.LENGTH


def test_adapter_larger_than_the_cache_is_an_error(model_dir):
    sched = create_scheduler(model_dir, num_blocks=16, scheduler_cls=SLoRAScheduler,
                             scheduler_kwargs={"pages_of": lambda lr: (40, "c")})
    req = make_request(16, 2, lora_request=lora(1))
    add_requests(sched, [req])
    loop = engine_loop(sched)
    loop.run(max_steps=5)
    reason, message = loop.finished_reasons()[req.request_id]
    assert reason == FinishReason.ERROR and "needs 40 KV pages" in message


def test_prefix_cache_is_keyed_by_adapter_content(model_dir):
    content = {1: "v1"}
    sched = create_scheduler(model_dir, num_blocks=64, scheduler_cls=SLoRAScheduler,
                             scheduler_kwargs={"pages_of": lambda lr: (2, content[lr.lora_int_id])})
    prompt = list(range(10, 74))  # 4 full blocks

    def cached_tokens() -> int:
        req = make_request(prompt_token_ids=prompt, max_tokens=1, lora_request=lora(1))
        add_requests(sched, [req])
        out = sched.schedule()
        sched.update_from_output(out, fake_model_output(out, {req.request_id: True}))
        assert req.is_finished()
        return len(prompt) - out.num_scheduled_tokens[req.request_id]

    assert cached_tokens() == 0
    assert cached_tokens() == 48  # same adapter content: the prefix is reused
    content[1] = "v2"  # same name and id, new weights on disk
    assert cached_tokens() == 0


@BOTH
def test_idle_adapters_stay_until_memory_is_needed_and_reset_evicts_them(model_dir,
                                                                         async_scheduling):
    sched = create_scheduler(model_dir, num_blocks=40, async_scheduling=async_scheduling,
                             scheduler_cls=scheduler_class(async_scheduling),
                             scheduler_kwargs={"pages_of": lambda lr: (6, "c")})
    loop = engine_loop(sched)
    add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in (1, 2, 3)])
    loop.run()
    assert sched.pool_stats()["adapters_idle"] == 3  # 18 of 39 pages, kept while free
    add_requests(sched, [make_request(440, 2)])  # 28 blocks, 21 free: two idle adapters go
    loop.run()
    stats = sched.pool_stats()
    assert stats["adapters_resident"] == 1 and stats["adapter_evictions"] == 2
    assert [r["lora_id"] for r in sched.adapter_residency()] == [3]  # LRU went first
    assert stats["preemptions"] == 0
    assert sched.reset_prefix_cache()
    assert sched.pool_stats()["adapters_resident"] == 0
    sched.add_request(make_request(16, 1))
    assert commands_of(sched.schedule()).evict == (3,)


def test_prefetch_hints_for_queued_adapters(model_dir):
    sched = create_scheduler(model_dir, num_blocks=64, max_num_seqs=2,
                             scheduler_cls=SLoRAScheduler,
                             scheduler_kwargs={"pages_of": lambda lr: (1, "c")})
    add_requests(sched, [make_request(16, 2, lora_request=lora(i)) for i in (1, 2, 3, 4, 3)])
    cmds = commands_of(sched.schedule())
    assert [l.lora_id for l in cmds.load] == [1, 2]
    assert cmds.prefetch == (("adapter-3", "/adapters/adapter-3"), ("adapter-4", "/adapters/adapter-4"))


def test_scheduler_class_matches_the_mode():
    assert scheduler_class(True) is SLoRAAsyncScheduler
    assert scheduler_class(False) is SLoRAScheduler


def test_unsupported_kv_layouts_are_refused(model_dir):
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, SlidingWindowSpec
    from vllm_cpu import build_kv_cache_config

    cfg = build_kv_cache_config(build_vllm_config(model_dir), 16)
    spec = cfg.kv_cache_groups[0].kv_cache_spec
    cfg.kv_cache_groups.append(KVCacheGroupSpec(["x"], spec))
    with pytest.raises(ValueError, match="exactly one KV cache group"):
        check_kv_cache_config(cfg)
    sw = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=spec.dtype,
                           sliding_window=64)
    cfg.kv_cache_groups[:] = [KVCacheGroupSpec(["x"], sw)]
    with pytest.raises(ValueError, match="full attention"):
        check_kv_cache_config(cfg)


def test_real_adapter_store_gives_the_pages(model_dir, tmp_path):
    """Without an injected pages_of, the scheduler reads adapters through the host store's
    config-level spec (adapter_config.json), with the layout's page count."""
    adapter = write_random_adapter(str(tmp_path / "adapters" / "qv8"), DIMS, 8,
                                   ["q_proj", "v_proj"])
    vllm_config = build_vllm_config(model_dir, additional_config={
        "slora": {"adapter_dir": str(tmp_path / "adapters"), "max_lora_rank": 16}})
    sched = create_scheduler(vllm_config=vllm_config, num_blocks=64, scheduler_cls=SLoRAScheduler)
    req = make_request(16, 2, lora_request=lora(1, name="qv8", path=adapter))
    missing = make_request(16, 2, lora_request=lora(2, name="nope", path=str(tmp_path / "nope")))
    add_requests(sched, [req, missing])
    loop = engine_loop(sched)
    (load,) = commands_of(loop.step()).load
    expected = plan_layout({"q_proj": 8, "v_proj": 8}, DIMS, sched.page_elems).num_pages
    assert len(load.block_ids) == expected and load.path == adapter
    loop.run()
    reason, message = loop.finished_reasons()[missing.request_id]
    assert reason == FinishReason.ERROR and "nope" in message


def test_real_adapter_store_gives_a_compressed_adapters_pages(model_dir, tmp_path):
    """An adapter of a compressed collection, by name: the real scheduler admits it with its
    cores' page count (`plan_cores`), and its load command carries the collection's path."""
    import torch

    from slora_plugin.adapters.index import AdapterIndex
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.core_layout import plan_cores

    write_random_adapter(str(tmp_path / "src" / "a"), DIMS, 2, ["q_proj", "v_proj"], seed=1)
    write_random_adapter(str(tmp_path / "src" / "b"), DIMS, 3, ["q_proj", "o_proj"], seed=2)
    root = tmp_path / "adapters"
    compress_collection(str(tmp_path / "src"), str(root / "coll"), 4, dims=DIMS,
                        dtype=torch.float32)
    vllm_config = build_vllm_config(model_dir, additional_config={
        "slora": {"adapter_dir": str(root), "max_lora_rank": 16}})
    sched = create_scheduler(vllm_config=vllm_config, num_blocks=64, scheduler_cls=SLoRAScheduler)
    path = AdapterIndex(str(root)).locate("coll/b")
    req = make_request(16, 2, lora_request=lora(1, name="coll/b", path=path))
    add_requests(sched, [req])
    loop = engine_loop(sched)
    (load,) = commands_of(loop.step()).load
    expected = plan_cores(["q_proj", "o_proj"], 4, False, sched.page_elems).num_pages
    assert len(load.block_ids) == expected and load.path == path and load.name == "coll/b"
    loop.run()
    assert loop.finished_reasons()[req.request_id][0] == FinishReason.LENGTH
