"""The version guard: a changed or missing vLLM name stops start-up with a useful message."""

from __future__ import annotations

import enum
import importlib
import inspect
import logging
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from slora_plugin.patches import catalogue, guard
from slora_plugin.patches.guard import (InstanceAttributes, Overrides, Requires,
                                        UnsupportedVLLMError)

ROOT = Path(__file__).resolve().parents[2]


def test_all_declared_names_hold_on_the_installed_vllm():
    assert guard.installed_vllm_version() == guard.SUPPORTED_VLLM
    assert guard.problems(catalogue.patch_modules()) == []
    guard.enforce(catalogue.patch_modules())


def test_every_patch_declares_its_names_and_no_version_of_its_own():
    """One vLLM version for the whole package (`guard.SUPPORTED_VLLM`)."""
    for mod in catalogue.patch_modules():
        assert not hasattr(mod, "VLLM_VERSION"), mod.__name__
        assert mod.REQUIRES and all(isinstance(r, (Requires, Overrides, InstanceAttributes))
                                    for r in mod.REQUIRES), mod.__name__


def test_setup_pins_the_supported_vllm():
    assert f'"vllm=={guard.SUPPORTED_VLLM}"' in (ROOT / "setup.py").read_text()


def test_the_catalogue_lists_every_file_of_patches_and_nothing_else():
    files = {p.stem for p in (ROOT / "patches").glob("*.py")}
    listed = [p.module for p in catalogue.PATCHES]
    assert len(listed) == len(set(listed))
    assert not set(listed) & set(catalogue.TOOLING)
    assert set(listed) | set(catalogue.TOOLING) == files
    for p in catalogue.PATCHES:
        assert p.what and p.why and p.removed_by and re.fullmatch(r"\d+\.\d+\.\d+", p.since), p


# -------------------------------------------------------------- our recorded signatures

def _closure_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    from slora_plugin.patches import engine_args

    engine_args.apply()
    return EngineArgs.create_engine_config


def _closures_v1():
    from slora_plugin.patches import lora_cudagraph

    dispatcher = SimpleNamespace(dispatch=lambda *a, **k: None)
    lora_cudagraph.capture_one_lora_case(SimpleNamespace(cudagraph_dispatcher=dispatcher),
                                         SimpleNamespace(max_loras=2))
    return dispatcher


def _closure_v2():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from slora_plugin.patches import lora_cudagraph

    runner = GPUModelRunner.__new__(GPUModelRunner)
    runner.cudagraph_manager = SimpleNamespace(lora_capture_cases=[3],
                                               dispatch=lambda *a, **k: None)
    lora_cudagraph.dispatch_to_lora_case(runner, SimpleNamespace(max_loras=2))
    return runner.cudagraph_manager.dispatch


def _closure_holding_back():
    from slora_plugin.patches import scheduler

    class Pool:
        def get_num_free_blocks(self) -> int:
            return 5

    pool = Pool()
    with scheduler.holding_back(pool, 1):
        return pool.get_num_free_blocks


def _closure_openai_errors(owner: str, name: str):
    """`openai_errors.apply()`'s wrapper of `owner.name`, leaving vLLM's classes as they were."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.engine.async_llm import AsyncLLM

    from slora_plugin.patches import openai_errors

    classes = {"AsyncLLM": AsyncLLM, "OpenAIServingModels": OpenAIServingModels}
    saved = {(c, n): classes[c].__dict__[n] for c, n in
             (("AsyncLLM", "add_lora"), ("AsyncLLM", "generate"), ("OpenAIServingModels", "resolve_lora"))}
    try:
        openai_errors.apply()
        return classes[owner].__dict__[name]
    finally:
        for (c, n), fn in saved.items():
            setattr(classes[c], n, fn)


#: Our replacements made inside patch functions, built the way the patches build them.
CLOSURES = {
    "slora_plugin.patches.engine_args:apply.<locals>.create_engine_config": _closure_engine_args,
    "slora_plugin.patches.lora_cudagraph:capture_one_lora_case.<locals>.dispatch":
        lambda: _closures_v1().dispatch,
    "slora_plugin.patches.lora_cudagraph:capture_one_lora_case.<locals>.<lambda>":
        lambda: _closures_v1()._get_lora_cases,
    "slora_plugin.patches.lora_cudagraph:dispatch_to_lora_case.<locals>.dispatch": _closure_v2,
    "slora_plugin.patches.scheduler:holding_back.<locals>.<lambda>": _closure_holding_back,
    "slora_plugin.patches.openai_errors:apply.<locals>.add_lora":
        lambda: _closure_openai_errors("AsyncLLM", "add_lora"),
    "slora_plugin.patches.openai_errors:apply.<locals>.generate":
        lambda: _closure_openai_errors("AsyncLLM", "generate"),
    "slora_plugin.patches.openai_errors:apply.<locals>.resolve_lora":
        lambda: _closure_openai_errors("OpenAIServingModels", "resolve_lora"),
}


def _ours(by: str):
    if "<locals>" in by:
        return CLOSURES[by]()
    module, _, qualname = by.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part) if not isinstance(obj, type) else obj.__dict__[part]
    return obj


OVERRIDES = [r for mod in catalogue.patch_modules() for r in mod.REQUIRES
             if isinstance(r, Overrides)]


@pytest.mark.parametrize("decl", OVERRIDES, ids=lambda d: f"{d.target}")
def test_recorded_override_signature_is_the_code_s(decl):
    """`by_signature` is what our override really takes (its own, not the wrapped one's), and
    it accepts every call vLLM's recorded signature allows."""
    ours = guard.params_of(_ours(decl.by), follow_wrapped=False)
    assert guard.render(ours) == decl.by_signature
    assert guard.refusals(guard.parse_signature(decl.signature), ours) == []


def test_every_override_of_a_vllm_class_is_declared():
    """Each method our vLLM subclasses define that vLLM's class also has is declared as an
    `Overrides` (with the signature it was written against)."""
    from slora_plugin.adapters.resolver import SLoRAResolver
    from slora_plugin.pool.scheduler import SLoRAKVCacheManager, _SLoRAScheduling
    from slora_plugin.worker.lora_layers import PagedLoRALayer
    from slora_plugin.worker.lora_manager import SLoRAModelManager, SLoRAWorkerLoRAManager
    from slora_plugin.worker.worker import SLoRAWorker

    declared = {d.by.partition(":")[2] for d in OVERRIDES}
    subclasses = {
        _SLoRAScheduling: ["vllm.v1.core.sched.scheduler:Scheduler",
                           "vllm.v1.core.sched.async_scheduler:AsyncScheduler"],
        SLoRAKVCacheManager: ["vllm.v1.core.kv_cache_manager:KVCacheManager"],
        SLoRAWorker: ["vllm.v1.worker.gpu_worker:Worker"],
        SLoRAModelManager: ["vllm.lora.model_manager:LRUCacheLoRAModelManager"],
        SLoRAWorkerLoRAManager: ["vllm.lora.worker_manager:LRUCacheWorkerLoRAManager"],
        PagedLoRALayer: ["vllm.lora.layers:ColumnParallelLinearWithLoRA"],
        SLoRAResolver: ["vllm.lora.resolver:LoRAResolver"],
    }
    for ours, bases in subclasses.items():
        for base in bases:
            module, _, name = base.partition(":")
            vllm_cls = getattr(importlib.import_module(module), name)
            for attr, value in vars(ours).items():
                if not inspect.isfunction(value) or not hasattr(vllm_cls, attr) or \
                        getattr(vllm_cls, attr) is getattr(object, attr, None):
                    continue  # ours alone, or replacing object's (vLLM never calls it)
                assert f"{ours.__qualname__}.{attr}" in declared, f"{ours.__qualname__}.{attr}"


# -------------------------------------------------------------- signatures

class Policy(enum.Enum):
    FCFS = "fcfs"


SENTINEL = object()


def _target(a, b=1, *rest, c: int = -2, d=Policy.FCFS, e=SENTINEL, f=(1, "x"), **kw):
    pass


def test_runtime_and_source_render_the_same_signature():
    text = "(a, b=1, *rest, c=-2, d=Policy.FCFS, e=SENTINEL, f=(1, 'x'), **kw)"
    assert guard.render(guard.params_of(_target)) == text
    assert guard.render(guard.parse_signature(text)) == text
    assert guard.render(guard.parse_signature("(self, x, /, y, *, z=None)")) == \
        "(self, x, /, y, *, z=None)"


def test_an_unnamed_default_matches_any_default_but_not_a_required_parameter():
    opaque = guard.parse_signature("(a, b=...)")
    assert guard.same_signature(opaque, guard.parse_signature("(a, b=REGISTRY)"))
    assert not guard.same_signature(opaque, guard.parse_signature("(a, b)"))
    assert not guard.same_signature(guard.parse_signature("(a, b=1)"),
                                    guard.parse_signature("(a, b=2)"))


@pytest.mark.parametrize("vllm, ours, refused", [
    ("(self, request, timestamp)", "(self, request, timestamp)", []),
    ("(self, request, timestamp, drop_stale_output=False)", "(self, request, timestamp)",
     ["drop_stale_output at position 2", "drop_stale_output by name"]),
    ("(self, request, timestamp, drop_stale_output=False)", "(self, *args, **kwargs)", []),
    ("(self, request, *, flag=False)", "(self, request, **kwargs)", []),
    ("(self, request, *, flag=False)", "(self, request)", ["flag by name"]),
    ("(self, req)", "(self, request)", ["req at position 0 (ours names it 'request')",
                                        "req by name"]),
    ("(self, request)", "(self, request, extra)", ["ours requires extra, which vLLM may not pass"]),
    ("(self, request, n=0)", "(self, request, n)", ["ours requires n, which vLLM may not pass"]),
    ("(self, *args, **kwargs)", "(self, a, b)", ["*args (ours has no *args)",
                                                 "**kwargs (ours has no **kwargs)"]),
    ("(self, n, m)", "(n, m=0)", []),  # set on the instance: no self on our side
])
def test_refusals(vllm, ours, refused):
    assert guard.refusals(guard.parse_signature(vllm), guard.parse_signature(ours)) == refused


# -------------------------------------------------------------- the guard on a faked vLLM

@pytest.fixture
def fake_vllm(monkeypatch):
    """A module `fake_vllm_sched` whose methods vLLM 0.27-0.28 changed (measured on their
    source): `_preempt_request` gains `drop_stale_output`, the V1 graph dispatcher's `dispatch`
    gains `max_query_len`."""
    mod = types.ModuleType("fake_vllm_sched")

    class Scheduler:
        def _preempt_request(self, request, timestamp, drop_stale_output=False):
            pass

        def schedule(self, throttle_prefills=False, budget=None):
            pass

    class CudagraphDispatcher:
        def dispatch(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0,
                     valid_modes=None, invalid_modes=None, max_query_len=None):
            pass

    mod.Scheduler, mod.CudagraphDispatcher = Scheduler, CudagraphDispatcher
    monkeypatch.setitem(sys.modules, "fake_vllm_sched", mod)
    return mod


def _fake_patch(*reqs):
    mod = types.ModuleType("slora_plugin.patches.fake_component")
    mod.REQUIRES = reqs
    return mod


PREEMPT = Overrides("fake_vllm_sched:Scheduler._preempt_request", "(self, request, timestamp)",
                    "slora_plugin.pool.scheduler:_SLoRAScheduling._preempt_request",
                    "(self, request, timestamp)")
DISPATCH = Overrides(
    "fake_vllm_sched:CudagraphDispatcher.dispatch",
    "(self, num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, "
    "valid_modes=None, invalid_modes=None)",
    "slora_plugin.patches.lora_cudagraph:capture_one_lora_case.<locals>.dispatch",
    "(num_tokens, uniform_decode=False, has_lora=False, num_active_loras=0, valid_modes=None, "
    "invalid_modes=None)")
SCHEDULE = Overrides("fake_vllm_sched:Scheduler.schedule", "(self, throttle_prefills=False)",
                     "slora_plugin.pool.scheduler:_SLoRAScheduling.schedule",
                     "(self, *args, **kwargs)")


@pytest.mark.parametrize("allow", [False, True])
def test_an_override_that_cannot_take_the_new_parameter_stops_start_up(fake_vllm, allow):
    with pytest.raises(UnsupportedVLLMError) as e:
        guard.enforce([_fake_patch(PREEMPT, DISPATCH)], allow_untested_version=allow)
    msg = str(e.value)
    assert f"cannot start on vLLM {guard.installed_vllm_version()}" in msg
    assert ("[fake_component] fake_vllm_sched:Scheduler._preempt_request: signature changed: "
            "expected (self, request, timestamp), found (self, request, timestamp, "
            "drop_stale_output=False); our override "
            "slora_plugin.pool.scheduler:_SLoRAScheduling._preempt_request"
            "(self, request, timestamp) cannot take: drop_stale_output at position 2; "
            "drop_stale_output by name") in msg
    assert "fake_vllm_sched:CudagraphDispatcher.dispatch: signature changed" in msg
    assert "max_query_len at position 6; max_query_len by name" in msg


def test_a_changed_signature_our_override_accepts_is_untested_only(fake_vllm, caplog):
    """Refused like another vLLM version, unless slora.allow_untested_vllm (then logged)."""
    with pytest.raises(UnsupportedVLLMError, match=re.escape(
            "fake_vllm_sched:Scheduler.schedule: signature changed: expected "
            "(self, throttle_prefills=False), found (self, throttle_prefills=False, "
            "budget=None) (our override slora_plugin.pool.scheduler:_SLoRAScheduling.schedule "
            "accepts it)")):
        guard.enforce([_fake_patch(SCHEDULE)])
    with caplog.at_level(logging.WARNING, logger="vllm.slora.guard"):
        guard.enforce([_fake_patch(SCHEDULE)], allow_untested_version=True)
    assert "untested vLLM: [fake_component] fake_vllm_sched:Scheduler.schedule" in caplog.text


def test_an_unchanged_signature_passes(fake_vllm):
    ok = Overrides("fake_vllm_sched:Scheduler._preempt_request",
                   "(self, request, timestamp, drop_stale_output=False)", "x", "(self, *a, **k)")
    guard.enforce([_fake_patch(ok)])


def test_instance_attributes_are_checked_on_live_instances():
    decl = InstanceAttributes("vllm.v1.core.block_pool:BlockPool", ("blocks", "num_gpu_blocks"))
    guard.check_instances("pool", [(SimpleNamespace(blocks=[], num_gpu_blocks=1), decl)])
    with pytest.raises(UnsupportedVLLMError,
                       match=re.escape("vLLM's pool lacks instance attribute(s) "
                                       "['BlockPool.num_gpu_blocks'] (written for vLLM 0.26.0)")):
        guard.check_instances("pool", [(SimpleNamespace(blocks=[]), decl)])


# -------------------------------------------------------------- names and the version

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


def test_a_missing_name_stops_start_up_even_when_untested_versions_are_allowed():
    fake = _fake_patch(Requires("vllm.engine.arg_utils:EngineArgs.gone"))
    with pytest.raises(UnsupportedVLLMError, match="'gone' is missing"):
        guard.enforce([fake], allow_untested_version=True)


def test_other_vllm_version_refused_unless_allowed(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.27.0")
    with pytest.raises(UnsupportedVLLMError, match="vLLM 0.27.0 is installed; this plugin is written for 0.26.0"):
        guard.enforce(catalogue.patch_modules())
    guard.enforce(catalogue.patch_modules(), allow_untested_version=True)


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
