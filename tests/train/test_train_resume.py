"""A stopped job resumes from its last checkpoint and ends exactly where an uninterrupted run
ends; the CLI runs and resumes a job; adapters appear in the output directory as they finish."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from slora_plugin.cli import main
from slora_plugin.train.job import load_job
from slora_plugin.train.trainer import METRICS, Trainer
from train_fixtures import one_thread, write_job  # noqa: F401 - fixture

ADAPTERS = [
    {"name": "a", "rank": 2, "alpha": 4, "target_modules": ["q_proj"], "lr": 1e-3, "batch_size": 2, "steps": 6},
    {"name": "team/b", "rank": 4, "alpha": 4, "target_modules": ["down_proj"], "lr": 1e-3, "batch_size": 1,
     "steps": 4, "warmup_steps": 2},
]


def job_in(directory, **kw) -> str:
    os.makedirs(directory, exist_ok=True)
    return write_job(str(directory), [dict(a) for a in ADAPTERS], checkpoint_every=2, **kw)


def saved(job_path: str, name: str) -> dict[str, torch.Tensor]:
    job = load_job(job_path)
    return load_file(os.path.join(job.output_dir, name, "adapter_model.safetensors"))


def test_killed_job_resumes_to_the_same_result(tmp_path, monkeypatch, one_thread) -> None:  # noqa: F811
    whole = job_in(tmp_path / "whole")
    Trainer(load_job(whole)).run(progress=False)

    stopped = job_in(tmp_path / "stopped")
    original = Trainer.train_step

    def killed_at_3(self: Trainer):
        if self.step == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2, before step 3 is logged
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_job(stopped)).run(progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert not os.path.exists(os.path.join(load_job(stopped).output_dir, "a")), "a is not done yet"

    trainer = Trainer(load_job(stopped))
    assert trainer.resume() and trainer.step == 2
    trainer.run(progress=False)
    for name in ("a", "team/b"):
        want, got = saved(whole, name), saved(stopped, name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with open(os.path.join(load_job(stopped).state_dir, METRICS)) as f:
        steps = [(d["step"], d["adapter"]) for d in map(json.loads, f)]
    assert steps == [(k, n) for k in range(6) for n in ("a", "team/b") if n == "a" or k < 4]


def test_resume_refuses_another_job(tmp_path, one_thread) -> None:  # noqa: F811
    path = job_in(tmp_path)
    Trainer(load_job(path)).run(max_steps=2, progress=False)
    body = json.load(open(path))
    body["adapters"][0]["lr"] = 5e-4
    json.dump(body, open(path, "w"))
    with pytest.raises(ValueError, match="another job"):
        Trainer(load_job(path)).resume()


def test_cli_trains_in_two_runs(tmp_path, capsys, one_thread) -> None:  # noqa: F811
    path = job_in(tmp_path)
    assert main(["train", path, "--max-steps", "3", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "a: step 3/6" in first and "team/b: step 3/4" in first
    assert main(["train", path, "--no-progress"]) == 0
    second = capsys.readouterr().out
    assert "resumed at step 3 of 6" in second and "a: saved" in second and "team/b: saved" in second
    assert sorted(os.listdir(tmp_path / "out")) == [".slora-train", "a", "team"]
    assert main(["train", str(tmp_path / "missing.json")]) == 2
