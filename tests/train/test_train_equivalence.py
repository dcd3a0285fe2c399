"""mLoRA equivalence (issue 16): four adapters of different ranks and target modules trained in
mixed batches lose, step by step, what each loses trained alone with PEFT + transformers (same
data order, init, AdamW, schedule, clipping; fp32 on the CPU) within 1e-3 relative over 50 steps;
the saved adapters load in PEFT (and pass the plugin's validator) and give the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slora_plugin.train.data import Row, micro_batches
from slora_plugin.train.job import load_job
from slora_plugin.train.peft_io import adapter_tensors
from slora_plugin.train.trainer import Trainer
from train_fixtures import MODEL_DIR, one_thread, write_job  # noqa: F401 - fixture

ADAPTERS = [
    {"name": "qv_r4", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "lr": 1e-3,
     "batch_size": 2, "steps": 50, "warmup_steps": 5, "seed": 11},
    {"name": "all_r8", "rank": 8, "alpha": 16, "target_modules": "all-linear", "lr": 5e-4, "batch_size": 3,
     "steps": 50, "lr_scheduler": "cosine", "weight_decay": 0.01, "seed": 12},
    {"name": "od_r2", "rank": 2, "alpha": 4, "target_modules": ["o_proj", "down_proj"], "lr": 2e-3,
     "batch_size": 1, "steps": 50, "lr_scheduler": "constant", "max_grad_norm": 0.5, "seed": 13},
    # 12 samples / 2 per step x 7 epochs = 42 steps: stops before the others (an idle adapter)
    {"name": "gu_r16", "rank": 16, "alpha": 8, "target_modules": r".*\.mlp\.(gate|up)_proj", "lr": 1e-3,
     "batch_size": 2, "epochs": 7, "max_grad_norm": None, "seed": 14},
]


def peft_alone(trainer: Trainer, slot: int, init: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """Train adapter `slot` alone with PEFT + transformers on the batches the trainer uses, on the
    trainer's device with the base in `dtype` (PEFT keeps the adapter in fp32); returns (losses
    per step, the PEFT model)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import (AutoModelForCausalLM, get_constant_schedule_with_warmup,
                              get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

    a = trainer.job.adapters[slot]
    targets = list(a.target_modules) if isinstance(a.target_modules, tuple) else a.target_modules
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).to(trainer.device)
    model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=targets, lora_dropout=0.0))
    set_peft_model_state_dict(model, init)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=trainer.job.adam_betas, eps=trainer.job.adam_eps,
                            weight_decay=a.weight_decay)
    total = trainer.totals[slot]
    sched = {"constant": lambda: get_constant_schedule_with_warmup(opt, a.warmup_steps),
             "linear": lambda: get_linear_schedule_with_warmup(opt, a.warmup_steps, total),
             "cosine": lambda: get_cosine_schedule_with_warmup(opt, a.warmup_steps, total)}[a.lr_scheduler]()
    model.train()
    losses = []
    for step in range(total):
        rows = [Row(0, trainer.samples[slot][i]) for i in trainer.streams[slot].batch(step)]
        (mb,) = micro_batches(rows, 10 ** 9)
        dev = trainer.device
        loss = model(input_ids=mb.input_ids.to(dev), attention_mask=mb.attention_mask.to(dev),
                     labels=mb.labels.to(dev)).loss
        loss.backward()
        if a.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


@pytest.mark.slow
def test_mixed_batch_training_equals_peft_alone(tmp_path, one_thread) -> None:  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slora_plugin.adapters.validate import plan_adapter
    from slora_plugin.layout import ModelDims

    # 64 padded tokens per micro-batch: a step is several forwards, gradients accumulate
    job = load_job(write_job(str(tmp_path), [dict(a) for a in ADAPTERS], micro_batch_tokens=64))
    trainer = Trainer(job)
    assert trainer.totals == [50, 50, 50, 42]
    init = [adapter_tensors(trainer.bank, s, torch.float32) for s in range(4)]
    logs = trainer.run(progress=False)

    worst = 0.0
    for slot, a in enumerate(job.adapters):
        ours = [log.loss for log in logs if log.adapter == a.name]
        theirs, peft_model = peft_alone(trainer, slot, init[slot])
        assert len(ours) == len(theirs) == trainer.totals[slot]
        rel = [abs(o - t) / abs(t) for o, t in zip(ours, theirs)]
        worst = max(worst, max(rel))
        assert max(rel) < 1e-3, f"{a.name}: step {rel.index(max(rel))} differs by {max(rel):.2e} relative"
        assert sum(theirs[-5:]) < sum(theirs[:5]), f"{a.name} did not learn: the comparison would be vacuous"

        # the saved adapter: loads in PEFT, gives the logits of the mixed-batch model and of the
        # adapter PEFT trained alone, and the plugin's validator accepts it on this model
        path = os.path.join(job.output_dir, a.name)
        cfg = json.load(open(os.path.join(path, "adapter_config.json")))
        plan = plan_adapter(cfg, ModelDims.from_hf_config(trainer.model.config), a.name, max_rank=64)
        assert set(plan.ranks.values()) == {a.rank}
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32),
                                           path).eval()
        rows = [Row(slot, trainer.samples[slot][i]) for i in range(3)]
        (mb,) = micro_batches(rows, 10 ** 9)
        with torch.no_grad():
            got = loaded(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            alone = peft_model.eval()(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            trainer.mixed.set_tokens(mb.token_slot)
            mixed = trainer.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        real = mb.attention_mask.bool()
        torch.testing.assert_close(got[real], mixed[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[real], alone[real], rtol=1e-3, atol=1e-3)
    print(f"largest relative loss difference over {len(logs)} adapter-steps: {worst:.2e}")
