"""The workload generator: reproducible, S-LoRA's distributions, and a lossless trace file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slora_plugin.bench.workload import (
    WorkloadError, WorkloadSpec, adapter_counts, gap_stats, generate, load_trace, parse_spec,
    prompt_tokens, save_trace)


def test_same_spec_same_trace_and_seed_matters():
    spec = WorkloadSpec(n_adapters=50, num_requests=300, alpha=0.5, arrival="gamma", rate=3,
                        input_len=(8, 512), output_len=(8, 512), seed=7)
    assert generate(spec) == generate(spec)
    other = generate(WorkloadSpec(**{**spec.__dict__, "seed": 8}))
    assert other.requests != generate(spec).requests


def test_adapter_choice_does_not_move_lengths_or_arrivals():
    """The base model's trace (no adapters) must match a LoRA trace request for request."""
    kw = dict(num_requests=200, arrival="gamma", rate=2, input_len=(8, 512), output_len=(8, 512))
    lora = generate(WorkloadSpec(n_adapters=1000, alpha=0.3, **kw))
    base = generate(WorkloadSpec(n_adapters=0, **kw))
    assert [(r.input_len, r.output_len, r.arrival_s) for r in lora.requests] == \
        [(r.input_len, r.output_len, r.arrival_s) for r in base.requests]
    assert all(r.adapter == -1 and r.rank == 0 for r in base.requests)


def test_power_law_skew():
    n = 100
    skewed = adapter_counts(generate(WorkloadSpec(n_adapters=n, num_requests=20000, alpha=0.1)).requests, n)
    uniform = adapter_counts(generate(WorkloadSpec(n_adapters=n, num_requests=20000, alpha=1.0)).requests, n)
    # numpy.random.power(0.1): P(adapter 0) = 0.01 ** 0.1 ~ 0.63
    assert skewed[0] / 20000 == pytest.approx(0.01 ** 0.1, abs=0.02)
    assert skewed[:10].sum() > 10 * skewed[-10:].sum()
    # alpha = 1 is uniform: every adapter near 200 requests
    assert uniform.min() > 140 and uniform.max() < 260
    assert skewed.argmax() == 0 and skewed.sum() == uniform.sum() == 20000


def test_adapter_ids_clamped_to_range():
    trace = generate(WorkloadSpec(n_adapters=3, num_requests=5000, alpha=5.0))
    assert {r.adapter for r in trace.requests} <= {0, 1, 2}


@pytest.mark.parametrize("rate,cv", [(4.0, 1.0), (2.0, 2.0), (10.0, 0.5)])
def test_gamma_arrivals_mean_rate_and_cv(rate, cv):
    trace = generate(WorkloadSpec(n_adapters=10, num_requests=20000, arrival="gamma", rate=rate, cv=cv))
    got_rate, got_cv = gap_stats([r.arrival_s for r in trace.requests])
    assert got_rate == pytest.approx(rate, rel=0.05)
    assert got_cv == pytest.approx(cv, rel=0.08)
    times = [r.arrival_s for r in trace.requests]
    assert times == sorted(times) and times[0] > 0


def test_untimed_arrivals_and_fixed_lengths_and_rank_mix():
    spec = WorkloadSpec(n_adapters=10, num_requests=100, arrival="all", ranks=(8, 64))
    trace = generate(spec)
    assert all(r.arrival_s is None and r.input_len == 256 and r.output_len == 128 for r in trace.requests)
    assert all(r.rank == (8 if r.adapter % 2 == 0 else 64) for r in trace.requests)


def test_length_ranges_are_inclusive():
    trace = generate(WorkloadSpec(num_requests=5000, input_len=(8, 12), output_len=(3, 4)))
    assert {r.input_len for r in trace.requests} == {8, 9, 10, 11, 12}
    assert {r.output_len for r in trace.requests} == {3, 4}


def test_trace_round_trip(tmp_path):
    trace = generate(WorkloadSpec(n_adapters=20, num_requests=50, arrival="gamma", rate=1.5, cv=2,
                                  input_len=(8, 512), ranks=(16, 32), name="mine"))
    path = save_trace(trace, str(tmp_path / "sub" / "t.jsonl"))
    assert load_trace(path) == trace


def test_load_trace_rejects_bad_files(tmp_path):
    trace = generate(WorkloadSpec(n_adapters=5, num_requests=4))
    path = save_trace(trace, str(tmp_path / "t.jsonl"))
    lines = open(path).read().splitlines()
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]))
    with pytest.raises(WorkloadError, match="spec says 4 requests, file has 3"):
        load_trace(str(tmp_path / "short.jsonl"))
    bad = json.loads(lines[1])
    bad["adapter"] = 5
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]))
    with pytest.raises(WorkloadError, match="adapter >= n_adapters=5"):
        load_trace(str(tmp_path / "bad.jsonl"))
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(WorkloadError, match="not a trace file"):
        load_trace(str(tmp_path / "junk.jsonl"))
    with pytest.raises(WorkloadError, match="cannot read"):
        load_trace(str(tmp_path / "missing.jsonl"))


def test_parse_spec():
    spec = parse_spec("n=1000,arrival=gamma,rate=4,cv=1,requests=300,in=8-512,out=64,ranks=8/16")
    assert (spec.n_adapters, spec.arrival, spec.rate, spec.num_requests) == (1000, "gamma", 4.0, 300)
    assert spec.input_len == (8, 512) and spec.output_len == (64, 64) and spec.ranks == (8, 16)
    assert parse_spec("", spec) == spec
    with pytest.raises(WorkloadError, match="unknown field 'nope'"):
        parse_spec("nope=1")
    with pytest.raises(WorkloadError, match="bad value 'x' for rate"):
        parse_spec("rate=x")
    with pytest.raises(WorkloadError, match="arrival must be one of"):
        parse_spec("arrival=poisson")
    with pytest.raises(WorkloadError, match="input_len must be a range"):
        parse_spec("in=9-8")


def test_prompt_tokens_are_deterministic_and_in_vocab():
    spec = WorkloadSpec(num_requests=3, input_len=(5, 300), seed=3)
    trace = generate(spec)
    a = [prompt_tokens(spec, r, 32000) for r in trace.requests]
    assert a == [prompt_tokens(spec, r, 32000) for r in trace.requests]
    assert [len(t) for t in a] == [r.input_len for r in trace.requests]
    assert all(3 <= t < 32000 for toks in a for t in toks)
    assert a[0] != a[1]
    assert np.unique(a[0]).size > 1
