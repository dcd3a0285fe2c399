"""Job file, data order, micro-batches, target matching (against PEFT), schedules (against
transformers) and the atomic PEFT writer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from slora_plugin.train.data import AdapterStream, Row, Sample, load_samples, micro_batches
from slora_plugin.train.job import JobError, load_job, parse_job, total_steps
from slora_plugin.train.optim import schedule
from slora_plugin.train.peft_io import write_adapter_atomic
from slora_plugin.train.targets import resolve_targets
from train_fixtures import MODEL_DIR, write_job

ADAPTER = {"name": "a", "data": "a.jsonl", "rank": 4, "alpha": 8, "target_modules": ["q_proj"], "lr": 1e-3,
           "batch_size": 2, "steps": 3}


def job_with(**adapter_overrides) -> dict:
    a = {**ADAPTER, **adapter_overrides}
    return {"base_model": "m", "output_dir": "out", "adapters": [{k: v for k, v in a.items() if v is not None}]}


def test_job_paths_defaults_and_fingerprint(tmp_path) -> None:
    path = write_job(str(tmp_path), [{k: v for k, v in ADAPTER.items() if k != "data"}])
    job = load_job(path)
    assert job.output_dir == str(tmp_path / "out") and job.adapters[0].data == str(tmp_path / "a.jsonl")
    assert job.state_dir == str(tmp_path / "out" / ".slora-train")
    assert job.adapters[0].lr_scheduler == "linear" and job.adapters[0].max_grad_norm == 1.0
    moved = parse_job({**json.load(open(path)), "output_dir": "/elsewhere"}, str(tmp_path))
    assert moved.fingerprint() == job.fingerprint()
    changed = parse_job(json.loads(open(path).read().replace('"lr": 0.001', '"lr": 0.002')), str(tmp_path))
    assert changed.fingerprint() != job.fingerprint()


@pytest.mark.parametrize("raw, message", [
    ({**job_with(), "learning_rate": 1}, "unknown field(s) ['learning_rate']"),
    (job_with(epochs=1), "exactly one of epochs and steps"),
    (job_with(steps=None), "exactly one of epochs and steps"),
    (job_with(name="../x"), "adapters[0].name"),
    (job_with(rank=0), "rank must be >= 1"),
    (job_with(lr="1e-3"), "lr must be a positive number"),
    (job_with(target_modules=[]), "target_modules"),
    (job_with(lr_scheduler="exp"), "lr_scheduler must be one of"),
    (job_with(max_grad_norm=-1), "max_grad_norm"),
    ({**job_with(), "dtype": "fp8"}, "job.dtype"),
    ({"base_model": "m", "output_dir": "o", "adapters": [ADAPTER, ADAPTER]}, "unique"),
])
def test_job_errors_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(JobError) as e:
        parse_job(raw, "/base")
    assert message in str(e.value)


def test_total_steps() -> None:
    job = parse_job(job_with(steps=None, epochs=2.5), "/")
    assert total_steps(job.adapters[0], 7) == 9  # ceil(2.5 * 7 / 2)


def test_samples_are_checked_and_truncated(tmp_path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"input_ids": [1, 2, 3, 4]}\n\n{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}\n')
    s = load_samples(str(p), 10, max_seq_len=3)
    assert s == [Sample((1, 2, 3), (1, 2, 3)), Sample((5, 6, 7), (-100, 6, 7))] and s[1].num_targets == 2
    for bad, msg in (('{"input_ids": [1, 99]}', "token ids in"), ('{"input_ids": [1]}', "no token to predict"),
                     ('{"text": "hi"}', "input_ids"), ('{"input_ids": [1, 2], "labels": [1]}', "labels")):
        p.write_text(bad + "\n")
        with pytest.raises(ValueError, match=msg):
            load_samples(str(p), 10)


def test_stream_is_a_function_of_the_step() -> None:
    a, b = AdapterStream(5, 2, seed=3, shuffle=True), AdapterStream(5, 2, seed=3, shuffle=True)
    seq = [a.batch(k) for k in range(5)]
    assert [b.batch(k) for k in reversed(range(5))] == list(reversed(seq))
    flat = sum(seq, [])
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5)), "each epoch is a permutation"
    assert flat[:5] != flat[5:10] and AdapterStream(5, 2, 3, False).batch(2) == [4, 0]


def test_micro_batches_pack_rows_and_mark_padding() -> None:
    rows = [Row(s, Sample(tuple(range(n)), tuple(range(n)))) for s, n in ((0, 3), (1, 5), (0, 2), (2, 5))]
    mbs = micro_batches(rows, max_tokens=10, pad_id=7)
    assert [mb.input_ids.shape for mb in mbs] == [(2, 5), (2, 3)]
    assert mbs[0].row_slot.tolist() == [1, 2] and mbs[1].row_slot.tolist() == [0, 0]
    last = mbs[1]
    assert last.token_slot.tolist() == [0, 0, 0, 0, 0, -1]
    assert last.input_ids[1].tolist() == [0, 1, 7] and last.labels[1].tolist() == [0, 1, -100]
    assert last.attention_mask[1].tolist() == [1, 1, 0]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r".*\.mlp\.(gate|up)_proj",
                                     ["layers.1.self_attn.o_proj"]])
def test_targets_match_peft(targets) -> None:
    """The layers PEFT wraps for the same target_modules, on the fixture model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    ours = resolve_targets(model, targets if isinstance(targets, str) else tuple(targets))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    theirs = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert ours == theirs


def test_targets_errors() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with pytest.raises(ValueError, match="match no module"):
        resolve_targets(model, ("nope",))
    with pytest.raises(ValueError, match="not nn.Linear"):
        resolve_targets(model, ("mlp",))


@pytest.mark.parametrize("kind, make", [
    ("constant", lambda o: __import__("transformers").get_constant_schedule_with_warmup(o, 3)),
    ("linear", lambda o: __import__("transformers").get_linear_schedule_with_warmup(o, 3, 10)),
    ("cosine", lambda o: __import__("transformers").get_cosine_schedule_with_warmup(o, 3, 10)),
])
def test_schedules_match_transformers(kind, make) -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    ours = schedule(kind, 3, 10)
    for step in range(12):
        assert ours(step) == pytest.approx(sched.lr_lambdas[0](step), abs=1e-12)


def test_atomic_write_publishes_whole_adapters_only(tmp_path) -> None:
    """The writer leaves no hidden temporary behind, replaces an existing adapter of the same
    name, and a failure while writing leaves the previous one in place."""
    out = str(tmp_path)
    t1 = {"w": torch.ones(2)}
    path = write_adapter_atomic(out, "org/x", {"r": 1}, t1)
    assert path == os.path.join(out, "org", "x") and sorted(os.listdir(path)) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o700), "the server may run as another user"
    write_adapter_atomic(out, "org/x", {"r": 2}, {"w": torch.zeros(2)})
    assert json.load(open(os.path.join(path, "adapter_config.json"))) == {"r": 2}
    with pytest.raises(Exception):
        write_adapter_atomic(out, "org/x", {"r": 3}, {"w": "not a tensor"})
    assert json.load(open(os.path.join(path, "adapter_config.json"))) == {"r": 2}
    assert os.listdir(os.path.join(out, "org")) == ["x"], "a temporary directory was left behind"


def test_atomic_write_puts_the_previous_adapter_back_when_publishing_fails(tmp_path, monkeypatch):
    """The previous adapter is moved aside before the new one is renamed in; if that rename
    fails, the previous one is back under its name and nothing hidden is left."""
    out = str(tmp_path)
    path = write_adapter_atomic(out, "x", {"r": 1}, {"w": torch.ones(2)})
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".x.tmp-"):
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        write_adapter_atomic(out, "x", {"r": 2}, {"w": torch.zeros(2)})
    assert json.load(open(os.path.join(path, "adapter_config.json"))) == {"r": 1}
    assert os.listdir(out) == ["x"]


def test_training_imports_nothing_of_vllm() -> None:
    """slora_plugin.train (and the training op) must run where vLLM is absent."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['vllm'] = None; "
            "import slora_plugin.train.trainer, slora_plugin.train.cli, slora_plugin.kernels.lora_function")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
