"""The worker's refusals of KV pages and models it cannot use (worker/scope.py)."""

from __future__ import annotations

import pytest
import torch

from slora_plugin.worker.scope import SLoRAScopeError, check_num_layers, page_elems


def test_page_elems_in_the_serving_dtype():
    assert page_elems(4096, torch.float16) == 2048
    assert page_elems(4096, torch.float32) == 1024
    with pytest.raises(SLoRAScopeError, match="KV page of 4098 bytes is not a whole number of "
                                              "torch.float32 elements"):
        page_elems(4098, torch.float32)


def test_one_kv_cache_per_decoder_layer():
    check_num_layers(4, 4)
    with pytest.raises(SLoRAScopeError, match="the model has 4 decoder layers but 3 attention"):
        check_num_layers(4, 3)
