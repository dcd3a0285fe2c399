"""Fixtures shared by every test: a tiny Llama-style model config and PEFT adapters on disk.

Without a GPU, Triton kernels run in Triton's interpreter; the switch is read when `triton.jit`
decorates a kernel, so it is set here, before any test module imports the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from slora_plugin.layout import ModelDims  # noqa: E402
from tiny_model import TINY_LLAMA, write_model_config  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path) -> str:
    return write_model_config(str(tmp_path / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dims() -> ModelDims:
    from types import SimpleNamespace

    return ModelDims.from_hf_config(SimpleNamespace(**TINY_LLAMA))


@pytest.fixture
def one_cpu_thread():
    """One torch CPU thread: tests of many small linear-algebra ops ran up to 35x slower with 2
    threads on the shared 2-core CI machine (thread hand-offs, not arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_platform(monkeypatch):
    """Let vLLM build engine configs on a machine without a GPU (its platform is 'unspecified')."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "cpu", raising=False)
    return current_platform


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import problem means no GPU for the tests
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run benchmarks/gpu_run.sh on the H100")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
