"""`slora-plugin train CONFIG`: run (or resume) a multi-adapter fine-tuning job."""

from __future__ import annotations

import argparse
from typing import Any


def add_subparser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune many LoRA adapters of one base model in mixed batches "
                                     "(mLoRA); adapters are saved in PEFT format as they finish")
    p.add_argument("config", help="job file (JSON): base_model, output_dir, adapters [...]")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this run (checkpointed; run again to resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from slora_plugin.train.job import JobError, load_job
    from slora_plugin.train.trainer import Trainer

    try:
        job = load_job(args.config)
    except (JobError, OSError) as e:
        print(f"error: {e}")
        return 2
    trainer = Trainer(job)
    if trainer.resume():
        print(f"resumed at step {trainer.step} of {trainer.num_steps} from {job.state_dir}")
    logs = trainer.run(max_steps=args.max_steps, progress=not args.no_progress)
    last = {log.adapter: log for log in logs}
    for a, total in zip(job.adapters, trainer.totals):
        state = "saved" if trainer.step >= total else f"step {trainer.step}/{total}"
        loss = f"loss {last[a.name].loss:.4f}" if a.name in last else "no step this run"
        print(f"{a.name}: {state}, {loss}")
    return 0
