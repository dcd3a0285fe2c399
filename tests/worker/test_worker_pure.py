"""Pure helpers of the worker: page copies, scope refusal, KV layout checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slora_plugin.patches.kv_pool import KVLayoutError, check_blocks_first
from slora_plugin.worker.worker import block_runs, copy_pages, scope_problems


def test_block_runs_merge_consecutive_ids():
    assert block_runs([4, 5, 6, 9, 10, 2]) == [(4, 0, 3), (9, 3, 2), (2, 5, 1)]
    assert block_runs([]) == []


def test_copy_pages_places_every_page_of_every_layer():
    host = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    pools = [torch.zeros(10 * 4) for _ in range(2)]
    copy_pages(pools, host, [7, 8, 1], 4)
    for l in range(2):
        assert torch.equal(pools[l].view(10, 4)[[7, 8, 1]], host[l])
        assert int((pools[l].view(10, 4)[[0, 2, 3, 4, 5, 6, 9]] != 0).sum()) == 0
    with pytest.raises(ValueError, match="expected"):
        copy_pages(pools, host, [7, 8], 4)


def _cfg(tp=1, pp=1, kv=None, sleep=False, sharded=False, lora=True):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        decode_context_parallel_size=1),
        kv_transfer_config=kv, model_config=SimpleNamespace(enable_sleep_mode=sleep),
        lora_config=SimpleNamespace(fully_sharded_loras=sharded) if lora else None)


def test_scope_refusals_name_the_setting():
    assert scope_problems(_cfg()) == []
    assert "tensor_parallel_size=2" in scope_problems(_cfg(tp=2))[0]
    assert "pipeline_parallel_size=2" in scope_problems(_cfg(pp=2))[0]
    assert "KV connector" in scope_problems(_cfg(kv=object()))[0]
    assert "sleep mode" in scope_problems(_cfg(sleep=True))[0]
    assert "fully_sharded_loras" in scope_problems(_cfg(sharded=True))[0]
    assert "not enabled" in scope_problems(_cfg(lora=False))[0]


def test_blocks_first_check():
    # FlashAttention 0.26: (num_blocks, kv_heads, block, 2*head) viewed with stride order 0,2,1,3
    nb, heads, bs, hd = 6, 2, 4, 8
    kv = torch.zeros(nb, bs, heads, hd, dtype=torch.float16).permute(0, 2, 1, 3)
    page = bs * heads * hd * 2
    check_blocks_first(kv, nb, page, "l0")
    with pytest.raises(KVLayoutError, match="blocks-first"):
        check_blocks_first(torch.zeros(2, nb, heads * bs * hd // 2, dtype=torch.float16), nb, page, "l0")
    with pytest.raises(KVLayoutError, match="expected"):
        check_blocks_first(kv, nb + 1, page, "l0")
