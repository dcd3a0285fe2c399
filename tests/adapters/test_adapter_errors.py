"""Bad adapters: the documented AdapterError (adapter, file, reason), remembered until the files
change, and never a crash or a disturbance of the other adapters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from slora_plugin.adapters import AdapterError, AdapterNotFoundError, AdapterStore
from slora_plugin.adapters.peft_format import (
    CONFIG_NAME, WEIGHTS_NAME, adapter_config, random_weights, tensor_name, write_adapter,
    write_random_adapter)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _store(root, dims, **kw) -> AdapterStore:
    return AdapterStore(dims, 512, torch.float16, adapter_dir=str(root), max_rank=kw.pop("max_rank", 32),
                        host_cache_bytes=kw.pop("host_cache_bytes", 1 << 20), loader_threads=2, **kw)


@pytest.mark.parametrize("extra, field", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 64}, "above the configured maximum"),
    ({"rank_pattern": {"q_proj": 40}}, "above the configured maximum"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": ["embed_tokens"]}, "embeddings"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, "'qkv_proj' names no module"),
    ({"target_modules": r".*\.qkv_proj"}, "matches no module"),
    ({"target_modules": ["mlp"]}, "not a linear layer"),
    ({"target_modules": "(["}, "not a valid regex"),
    ({"lora_alpha": "big"}, "lora_alpha"),
])
def test_config_refusals_name_adapter_file_and_field(tmp_path, tiny_dims, extra, field):
    cfg = adapter_config(8, 16, TARGETS)
    cfg.update(extra)
    write_adapter(str(tmp_path / "org" / "bad"), cfg, {})
    with _store(tmp_path, tiny_dims) as store:
        with pytest.raises(AdapterError) as e:
            store.spec("org/bad")
    assert e.value.adapter == "org/bad" and e.value.file == CONFIG_NAME
    assert field in e.value.reason and "org/bad" in str(e.value)


def _good(root, dims, name="good"):
    return write_random_adapter(str(root / name), dims, 8, TARGETS, seed=1)


CORRUPTIONS = ["truncate", "garbage_header", "zero_file", "nan", "inf", "extra_tensor", "missing_tensor",
               "wrong_shape", "int_dtype", "unknown_name", "config_json", "no_weights"]


def _corrupt(path: str, how: str, dims, draw_int) -> str:
    """Damage the adapter at `path`; returns the file the error must name."""
    wfile, cfile = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    tensors = random_weights(dims, {m: 8 for m in TARGETS}, torch.Generator().manual_seed(2))
    layer = draw_int(0, dims.num_hidden_layers - 1)
    key = tensor_name(layer, TARGETS[draw_int(0, 2)], "AB"[draw_int(0, 1)])
    if how == "truncate":
        size = os.path.getsize(wfile)
        with open(wfile, "r+b") as f:
            f.truncate(draw_int(1, size - 1))
    elif how == "garbage_header":
        with open(wfile, "r+b") as f:
            f.seek(8 + draw_int(0, 20))
            f.write(b"\xff\x00{")
    elif how == "zero_file":
        open(wfile, "wb").close()
    elif how in ("nan", "inf"):
        t = tensors[key].clone()
        t.view(-1)[draw_int(0, t.numel() - 1)] = float(how)
        tensors[key] = t
        save_file(tensors, wfile)
    elif how == "extra_tensor":
        tensors[tensor_name(layer, "k_proj", "A")] = torch.zeros(8, dims.hidden_size, dtype=torch.float16)
        save_file(tensors, wfile)
    elif how == "missing_tensor":
        del tensors[key]
        save_file(tensors, wfile)
    elif how == "wrong_shape":
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1], dtype=torch.float16)
        save_file(tensors, wfile)
    elif how == "int_dtype":
        tensors[key] = tensors[key].to(torch.int16)
        save_file(tensors, wfile)
    elif how == "unknown_name":
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64, dtype=torch.float16)
        save_file(tensors, wfile)
    elif how == "config_json":
        with open(cfile, "w") as f:
            f.write('{"peft_type": "LORA", "r": ')
        return CONFIG_NAME
    elif how == "no_weights":
        os.unlink(wfile)
    return WEIGHTS_NAME


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), how=st.sampled_from(CORRUPTIONS))
def test_random_corruption_gives_adapter_error_and_spares_others(tmp_path_factory, tiny_dims, data, how):
    root = tmp_path_factory.mktemp("c")
    good = _good(root, tiny_dims)
    bad = write_random_adapter(str(root / "bad"), tiny_dims, 8, TARGETS, seed=2)
    file = _corrupt(bad, how, tiny_dims, lambda lo, hi: data.draw(st.integers(lo, hi)))
    with _store(root, tiny_dims) as store:
        with store.get("good") as lease:
            before = lease.raw.buffer.clone()
        for _ in range(2):  # the second time the remembered error is raised
            with pytest.raises(AdapterError) as e:
                store.get("bad").release()
            assert e.value.adapter == "bad" and e.value.file == file and e.value.reason
        store.prefetch(["bad", "good"])  # never raises
        with store.get("good") as lease:
            assert torch.equal(lease.raw.buffer, before)
        s = store.stats()
        assert s["load_errors"] + s["specs_bad"] >= 1
    assert os.path.isdir(good)


def test_error_is_remembered_until_the_files_change(tmp_path, tiny_dims, monkeypatch):
    from slora_plugin.adapters import loader

    path = write_random_adapter(str(tmp_path / "a"), tiny_dims, 8, TARGETS, seed=3)
    tensors = random_weights(tiny_dims, {m: 8 for m in TARGETS}, torch.Generator().manual_seed(3))
    bad = dict(tensors)
    bad[tensor_name(0, "q_proj", "A")] = bad[tensor_name(0, "q_proj", "A")].clone().fill_(float("nan"))
    save_file(bad, os.path.join(path, WEIGHTS_NAME))
    reads = []
    real = loader.open_weights
    monkeypatch.setattr(loader, "open_weights", lambda *a, **k: reads.append(a) or real(*a, **k))
    with _store(tmp_path, tiny_dims) as store:
        for _ in range(3):
            with pytest.raises(AdapterError, match="layer 0 q_proj lora_A has NaN"):
                store.get("a")
        assert len(reads) == 1  # remembered: the broken file is read once
        save_file(tensors, os.path.join(path, WEIGHTS_NAME))  # the operator fixes it
        os.utime(os.path.join(path, WEIGHTS_NAME), ns=(1, 10**18))
        with store.get("a") as lease:
            assert all(lease.raw.a(m).isfinite().all() and lease.raw.b(m).isfinite().all() for m in TARGETS)
        # config fixed the same way
        cfg = json.load(open(os.path.join(path, CONFIG_NAME)))
        cfg["use_dora"] = True
        json.dump(cfg, open(os.path.join(path, CONFIG_NAME), "w"))
        with pytest.raises(AdapterError, match="DoRA"):
            store.spec("a")
        cfg["use_dora"] = False
        json.dump(cfg, open(os.path.join(path, CONFIG_NAME), "w"), indent=1)
        assert store.spec("a").ranks == {m: 8 for m in TARGETS}


def test_adapter_larger_than_budget_is_an_error_naming_it(tmp_path, tiny_dims):
    write_random_adapter(str(tmp_path / "big"), tiny_dims, 8, TARGETS)
    with _store(tmp_path, tiny_dims, host_cache_bytes=4096) as store:
        with pytest.raises(AdapterError, match="more than the whole host cache") as e:
            store.get("big")
        assert e.value.adapter == "big"


def test_unknown_name_is_not_found_and_not_remembered(tmp_path, tiny_dims):
    with _store(tmp_path, tiny_dims) as store:
        with pytest.raises(AdapterNotFoundError):
            store.spec("later")
        _good(tmp_path, tiny_dims, "later")  # added while running: found on the first request
        with store.get("later") as lease:
            assert lease.spec.name == "later"


@pytest.mark.parametrize("serve", [torch.float16, torch.bfloat16])
def test_scaled_overflow_and_large_sums(tmp_path, tiny_dims, serve):
    """B finite in the file but past the dtype's range once multiplied by its scale is refused
    (the GPU would write Inf); values whose sum overflows but that are all finite are accepted."""
    big = torch.finfo(serve).max
    tensors = random_weights(tiny_dims, {m: 8 for m in TARGETS}, torch.Generator().manual_seed(5), serve)
    ok = dict(tensors)
    key = tensor_name(1, "q_proj", "A")
    ok[key] = torch.full_like(ok[key], big / 4)  # finite, sums to Inf
    write_adapter(str(tmp_path / "sums"), adapter_config(8, 8, TARGETS), ok)  # scale 1
    bad = dict(tensors)
    key = tensor_name(1, "v_proj", "B")
    bad[key] = bad[key].clone()
    bad[key][3, 2] = big / 1.5  # finite, x2 overflows
    write_adapter(str(tmp_path / "scaled"), adapter_config(8, 16, TARGETS), bad)  # scale 2
    with AdapterStore(tiny_dims, 512, serve, adapter_dir=str(tmp_path), max_rank=32,
                      host_cache_bytes=1 << 20, loader_threads=1) as store:
        with store.get("sums"):
            pass
        with pytest.raises(AdapterError, match="layer 1 v_proj lora_B has NaN or Inf values "
                                               r"\(after scaling"):
            store.get("scaled")
