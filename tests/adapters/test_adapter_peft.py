"""An adapter written by the real `peft` library validates, and the pages written from its raw
host form hold exactly PEFT's delta (B @ A * scale) for every module of every layer."""

from __future__ import annotations

import torch

from raw_pages import render_pages
from tiny_model import TINY_LLAMA
from slora_plugin.adapters import AdapterStore
from slora_plugin.layout import unpack_layer


def _peft_model(save_dir: str, use_rslora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"}))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 12},
                     alpha_pattern={"v_proj": 3}, use_rslora=use_rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(save_dir)
    return peft_model


def test_real_peft_adapter_packs_to_peft_delta(tmp_path, tiny_dims):
    for use_rslora in (False, True):
        name = f"peft-rslora-{use_rslora}"
        peft_model = _peft_model(str(tmp_path / name), use_rslora)
        with AdapterStore(tiny_dims, 512, torch.float32, adapter_dir=str(tmp_path), max_rank=16,
                          host_cache_bytes=1 << 20, loader_threads=1) as store:
            spec = store.spec(name)
            assert spec.ranks == {"q_proj": 8, "v_proj": 8, "o_proj": 8, "down_proj": 12}
            with store.get(name) as lease:
                pages = render_pages(lease.raw, spec.layout)
        checked = 0
        for layer, block in enumerate(peft_model.base_model.model.model.layers):
            got = unpack_layer(spec.layout, pages[layer])
            for parent, m in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                              ("mlp", "down_proj")):
                lora = getattr(getattr(block, parent), m)
                delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
                a, b = got[m]
                torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)
                assert int((a.abs().sum(1) > 0).sum()) == lora.r["default"]  # unused rows stay zero
                checked += 1
        assert checked == 8
