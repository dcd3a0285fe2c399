"""The version guard: a changed or missing vLLM name stops start-up with a useful message."""

from __future__ import annotations

import types

import pytest

from slora_plugin.patches import guard, registry
from slora_plugin.patches.guard import Requires, UnsupportedVLLMError


def test_all_declared_names_hold_on_the_installed_vllm():
    assert guard.installed_vllm_version() == guard.SUPPORTED_VLLM
    assert guard.problems(registry.patch_modules()) == []
    guard.enforce(registry.patch_modules())


def test_every_patch_declares_its_version_and_names():
    for mod in registry.patch_modules():
        assert mod.VLLM_VERSION == guard.SUPPORTED_VLLM, mod.__name__
        assert mod.REQUIRES and all(isinstance(r, Requires) for r in mod.REQUIRES), mod.__name__


def _fake_patch(*reqs):
    mod = types.ModuleType("slora_plugin.patches.fake_component")
    mod.REQUIRES = reqs
    return mod


def test_missing_name_is_reported_with_versions():
    fake = _fake_patch(Requires("vllm.engine.arg_utils:EngineArgs.create_engine_config_v2"))
    with pytest.raises(UnsupportedVLLMError) as e:
        guard.enforce([fake])
    msg = str(e.value)
    assert "vLLM 0.26.0" in msg and "supported: vLLM 0.26.0" in msg
    assert "[fake_component]" in msg and "'create_engine_config_v2' is missing" in msg


def test_changed_signature_is_reported():
    fake = _fake_patch(Requires("vllm.engine.arg_utils:EngineArgs.create_engine_config",
                                ("self", "usage_context", "renamed_arg")))
    with pytest.raises(UnsupportedVLLMError, match=r"parameter\(s\) \['renamed_arg'\] missing"):
        guard.enforce([fake])


def test_missing_module_is_reported():
    fake = _fake_patch(Requires("vllm.no_such_module:Thing"))
    with pytest.raises(UnsupportedVLLMError, match="vllm.no_such_module cannot be imported"):
        guard.enforce([fake])


def test_other_vllm_version_refused_unless_allowed(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.27.0")
    with pytest.raises(UnsupportedVLLMError, match="vLLM 0.27.0 is installed; this plugin is written for 0.26.0"):
        guard.enforce(registry.patch_modules())
    guard.enforce(registry.patch_modules(), allow_untested_version=True)


def test_mismatch_stops_engine_config_creation(monkeypatch, tiny_model_dir, cpu_platform):
    """End to end: with the plugin on, a broken requirement fails `create_engine_config`."""
    from vllm.engine.arg_utils import EngineArgs

    from slora_plugin.patches import engine_args

    monkeypatch.setattr(engine_args, "REQUIRES",
                        engine_args.REQUIRES + (Requires("vllm.engine.arg_utils:EngineArgs.gone"),))
    args = EngineArgs(model=tiny_model_dir, skip_tokenizer_init=True, load_format="dummy",
                      additional_config={"slora": {}})
    with pytest.raises(UnsupportedVLLMError, match="'gone' is missing"):
        args.create_engine_config()
