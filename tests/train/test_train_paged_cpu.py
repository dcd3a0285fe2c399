"""The paged backend inside the real trainer, on the CPU under the Triton interpreter: two steps
of two adapters with an fp16 base give the losses and gradient norms of the torch backend (the
GPU test checks it at length; this one catches a wiring error where no GPU is)."""

from __future__ import annotations

import os

import pytest

from slora_plugin.train.job import load_job
from slora_plugin.train.trainer import Trainer
from train_fixtures import one_thread, write_job  # noqa: F401 - fixture

ADAPTERS = [
    {"name": "qv", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "lr": 1e-3, "batch_size": 2,
     "steps": 2},
    {"name": "o", "rank": 8, "alpha": 8, "target_modules": ["o_proj"], "lr": 1e-3, "batch_size": 1, "steps": 2},
]


@pytest.mark.slow
def test_paged_backend_matches_torch_backend_in_the_trainer(tmp_path, one_thread) -> None:  # noqa: F811
    logs = {}
    for backend in ("paged", "torch"):
        d = tmp_path / backend
        os.makedirs(d)
        trainer = Trainer(load_job(write_job(str(d), [dict(a) for a in ADAPTERS], dtype="float16",
                                             backend=backend)))
        assert type(trainer.mixed.backend).__name__ == {"paged": "PagedBackend", "torch": "TorchBackend"}[backend]
        logs[backend] = trainer.run(progress=False)
    for got, want in zip(logs["paged"], logs["torch"]):
        assert (got.step, got.adapter) == (want.step, want.adapter)
        assert abs(got.loss - want.loss) <= 1e-3 * want.loss, (got, want)
        assert abs(got.grad_norm - want.grad_norm) <= 1e-3 * want.grad_norm, (got, want)
