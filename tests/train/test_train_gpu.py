"""The equivalence of issue 16 on the GPU: the paged backend (serving kernels + segmented weight
gradients) with a bf16 base, against PEFT alone with the same bf16 base (fp32 adapter weights).
The two round differently (the kernels read the adapters as bf16 pages; PEFT computes LoRA in
fp32), so the bound is looser than the CPU fp32 test's 1e-3."""

from __future__ import annotations

import pytest
import torch

from slora_plugin.train.job import load_job
from slora_plugin.train.peft_io import adapter_tensors
from slora_plugin.train.trainer import Trainer
from test_train_equivalence import ADAPTERS, peft_alone
from train_fixtures import write_job


@pytest.mark.gpu
def test_paged_backend_bf16_tracks_peft_alone(tmp_path) -> None:
    pytest.importorskip("peft", reason="the PEFT baseline needs peft (the test extra)")
    adapters = [dict(a, steps=20) if "steps" in a else dict(a, epochs=3) for a in ADAPTERS]
    job = load_job(write_job(str(tmp_path), adapters, dtype="bfloat16", device="cuda", micro_batch_tokens=64))
    trainer = Trainer(job)
    assert type(trainer.mixed.backend).__name__ == "PagedBackend"
    init = [adapter_tensors(trainer.bank, s, torch.float32) for s in range(len(adapters))]
    logs = trainer.run(progress=False)
    for slot, a in enumerate(job.adapters):
        ours = [log.loss for log in logs if log.adapter == a.name]
        theirs, _ = peft_alone(trainer, slot, init[slot], dtype=torch.bfloat16)
        rel = max(abs(o - t) / abs(t) for o, t in zip(ours, theirs))
        assert rel < 2e-2, f"{a.name}: losses differ by {rel:.2e} relative"
