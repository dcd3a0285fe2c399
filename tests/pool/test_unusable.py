"""Which requests have an unusable adapter, and why: pool/unusable.py with plain objects (no
vLLM scheduler)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.pool.page_pool import AdapterNeed
from slora_plugin.pool.unusable import (AdapterUnusable, adapter_need, describe_failure,
                                        mark_failed_loads)


def lora(i: int) -> SimpleNamespace:
    return SimpleNamespace(lora_int_id=i, lora_name=f"a{i}", lora_path=f"/adapters/a{i}")


def request(rid: str, lora_id: int | None, finished: bool = False) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, lora_request=None if lora_id is None else lora(lora_id),
                           is_finished=lambda: finished)


def test_need_of_a_usable_adapter_and_of_none():
    pages_of = {"/adapters/a1": (3, "c1")}.__getitem__
    assert adapter_need(None, pages_of, 10) is None
    assert adapter_need(lora(1), lambda lr: pages_of(lr.lora_path), 3) == AdapterNeed(
        1, "a1", "/adapters/a1", 3, "c1")


def test_a_failing_spec_is_unusable_naming_the_adapter_once():
    def boom(lr):
        raise OSError("no such file")

    with pytest.raises(AdapterUnusable, match=r"^adapter 'a1' \(/adapters/a1\): no such file$"):
        adapter_need(lora(1), boom, 10)
    named = AdapterError("a1", "adapter_config.json", "bad rank")

    def refuse(lr):
        raise named

    with pytest.raises(AdapterUnusable) as e:
        adapter_need(lora(1), refuse, 10)
    assert str(e.value) == str(named) == describe_failure(lora(1), named)  # not named twice
    assert e.value.__cause__ is named


def test_an_adapter_larger_than_the_kv_cache_is_unusable():
    with pytest.raises(AdapterUnusable, match=r"'a2' .*needs 11 KV pages but the whole KV cache "
                                              r"has 10; raise gpu_memory_utilization"):
        adapter_need(lora(2), lambda lr: (11, "c"), 10)
    assert adapter_need(lora(2), lambda lr: (10, "c"), 10).num_pages == 10


def test_failed_loads_break_the_adapters_and_fail_their_unfinished_requests():
    broken: list[int] = []
    marked: list[tuple[str, str]] = []
    pool = SimpleNamespace(mark_broken=broken.append)
    requests = [request("r1", 1), request("r2", 2), request("r3", None), request("r4", 1, True),
                request("r5", 3)]
    mark_failed_loads({1: "truncated", 3: "host cache"}, pool, requests,
                      lambda rid, why: marked.append((rid, why)))
    assert broken == [1, 3]
    assert marked == [("r1", "truncated"), ("r5", "host cache")]
