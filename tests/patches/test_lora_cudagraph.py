"""One set of CUDA graphs with the plugin: vLLM's real graph manager (V2) and dispatcher (V1),
patched on the instance, capture only the LoRA case and dispatch every batch to it; an
unpatched instance keeps vLLM's behaviour."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.config import CompilationConfig, CUDAGraphMode
from vllm.config.compilation import CompilationMode
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu import cudagraph_utils
from vllm.v1.worker.gpu.lora_utils import get_lora_capture_cases
from vllm.v1.worker.gpu.model_runner import GPUModelRunner

from slora_plugin.patches import lora_cudagraph as graphs
from slora_plugin.patches.guard import UnsupportedVLLMError

MAX_LORAS = 4
CASE = MAX_LORAS + 1
SIZES = [1, 2, 4, 8]


def _lora_config():
    return SimpleNamespace(max_loras=MAX_LORAS, specialize_active_lora=False)


def _compilation_config():
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_capture_sizes=SIZES,
                           max_cudagraph_capture_size=max(SIZES),
                           cudagraph_specialize_lora=False,
                           splitting_ops=list(CompilationConfig._attention_ops))
    cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    return cc


def _vllm_config():
    return SimpleNamespace(
        compilation_config=_compilation_config(), lora_config=_lora_config(),
        scheduler_config=SimpleNamespace(max_num_seqs=8), speculative_config=None,
        num_speculative_tokens=0,
        parallel_config=SimpleNamespace(data_parallel_size=1, tensor_parallel_size=1))


def _v2_runner() -> GPUModelRunner:
    """A V2 runner as its __init__ leaves the LoRA cases (the rest is not needed here)."""
    runner = GPUModelRunner.__new__(GPUModelRunner)
    cfg = _vllm_config()
    runner.lora_config = cfg.lora_config
    runner.lora_capture_cases = get_lora_capture_cases(cfg.lora_config, cfg.compilation_config)
    return runner


def _v2_manager(monkeypatch, cases):
    """vLLM's real V2 graph manager (what initialize_kv_cache builds), marked as captured."""
    monkeypatch.setattr(cudagraph_utils, "get_pp_group",
                        lambda: SimpleNamespace(is_first_rank=True, is_last_rank=True))
    monkeypatch.setattr(cudagraph_utils.current_platform, "get_global_graph_pool",
                        lambda: None, raising=False)
    m = cudagraph_utils.ModelCudaGraphManager(_vllm_config(), "cpu",
                                              CUDAGraphMode.FULL_AND_PIECEWISE,
                                              decode_query_len=1, lora_capture_cases=cases)
    m._graphs_captured = True
    return m


def test_stock_v2_captures_two_lora_cases_and_runs_no_adapter_batches_in_the_zero_case(
        monkeypatch):
    runner = _v2_runner()
    assert runner.lora_capture_cases == [0, CASE]
    m = _v2_manager(monkeypatch, runner.lora_capture_cases)
    cases = {d.num_active_loras for descs in m._capture_descs.values() for d in descs}
    assert cases == {0, CASE}
    assert m.dispatch(3, 3, 1, num_active_loras=0).num_active_loras == 0


def test_patched_v2_captures_one_case_and_dispatches_every_batch_to_it(monkeypatch):
    runner = _v2_runner()
    graphs.capture_one_lora_case(runner, runner.lora_config)
    assert runner.lora_capture_cases == [CASE]
    runner.cudagraph_manager = _v2_manager(monkeypatch, runner.lora_capture_cases)
    graphs.dispatch_to_lora_case(runner, runner.lora_config)
    m = runner.cudagraph_manager
    descs = [d for ds in m._capture_descs.values() for d in ds]
    assert {d.num_active_loras for d in descs} == {CASE}
    assert len(descs) == 2 * len(SIZES)  # one FULL (decode) + one PIECEWISE per size
    for active in (0, 1, MAX_LORAS):
        for tokens, reqs, uniform in ((3, 3, 1), (7, 2, None)):
            d = m.dispatch(reqs, tokens, uniform, num_active_loras=active)
            assert d.num_active_loras == CASE and d.cg_mode != CUDAGraphMode.NONE, (active, d)
    assert m.dispatch(3, 3, 1, num_active_loras=0).cg_mode == CUDAGraphMode.FULL
    assert m.dispatch(2, 7, None, num_active_loras=0).cg_mode == CUDAGraphMode.PIECEWISE
    # past the largest graph: eager, whatever the adapters
    assert m.dispatch(9, 9, 1, num_active_loras=0).cg_mode == CUDAGraphMode.NONE


def test_v2_dispatch_refuses_a_manager_built_before_the_capture_patch(monkeypatch):
    runner = _v2_runner()
    runner.cudagraph_manager = _v2_manager(monkeypatch, runner.lora_capture_cases)
    with pytest.raises(UnsupportedVLLMError, match=r"expected \[5\]"):
        graphs.dispatch_to_lora_case(runner, runner.lora_config)


def _v1_runner():
    return SimpleNamespace(cudagraph_dispatcher=CudagraphDispatcher(_vllm_config()))


def test_stock_v1_runs_batches_without_adapters_eagerly():
    d = _v1_runner().cudagraph_dispatcher
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE)
    assert d.dispatch(3, uniform_decode=True, has_lora=True, num_active_loras=2)[0] \
        == CUDAGraphMode.FULL
    assert d.dispatch(3, uniform_decode=True, has_lora=False, num_active_loras=0)[0] \
        == CUDAGraphMode.NONE


def test_patched_v1_dispatches_every_batch_to_the_lora_graphs():
    runner = _v1_runner()
    graphs.capture_one_lora_case(runner, _lora_config())
    d = runner.cudagraph_dispatcher
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE)
    keys = d.cudagraph_keys[CUDAGraphMode.FULL] | d.cudagraph_keys[CUDAGraphMode.PIECEWISE]
    assert {k.num_active_loras for k in keys} == {CASE}
    for has_lora, active in ((False, 0), (True, 1), (True, MAX_LORAS)):
        mode, desc = d.dispatch(3, uniform_decode=True, has_lora=has_lora,
                                num_active_loras=active)
        assert mode == CUDAGraphMode.FULL and desc.num_active_loras == CASE
        mode, desc = d.dispatch(7, uniform_decode=False, has_lora=has_lora,
                                num_active_loras=active)
        assert mode == CUDAGraphMode.PIECEWISE and desc.num_tokens == 8


def test_the_patch_touches_only_the_given_instances(monkeypatch):
    patched, stock = _v1_runner(), _v1_runner()
    graphs.capture_one_lora_case(patched, _lora_config())
    stock.cudagraph_dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE)
    assert stock.cudagraph_dispatcher.dispatch(3, uniform_decode=True)[0] == CUDAGraphMode.NONE
    assert "dispatch" not in vars(stock.cudagraph_dispatcher)
    assert CudagraphDispatcher.dispatch is not patched.cudagraph_dispatcher.dispatch
    assert _v2_runner().lora_capture_cases == [0, CASE]
