"""The GPU runner's CPU-side logic: cold adapter naming, adapter files, engine arguments, and
the arrival/step loop driven against a fake engine (the real one needs the H100)."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from slora_plugin.bench.cli import _traces, add_subparser, main
from slora_plugin.bench.pool_log import POOL_KEYS
from slora_plugin.bench.profile import ProfileWindow
from slora_plugin.bench.run import (
    PROFILE_PREFIX, WARMUP_REQUESTS, BenchError, RunOptions, adapter_name, adapter_plan, engine_kwargs,
    ServedAdapters, prepare_adapters, run_trace, trace_offsets)
from slora_plugin.bench.workload import WorkloadSpec, generate
from slora_plugin.model_config import load_model_config


def _trace(**kw):
    return generate(WorkloadSpec(**kw))


def test_every_trace_gets_fresh_adapters():
    traces = [_trace(n_adapters=1, num_requests=5), _trace(n_adapters=3, num_requests=5, ranks=(8, 16)),
              _trace(n_adapters=0, num_requests=5)]
    assert trace_offsets(traces) == [WARMUP_REQUESTS, WARMUP_REQUESTS + 1, WARMUP_REQUESTS + 4]
    plan = adapter_plan(traces)
    assert sorted(plan) == list(range(WARMUP_REQUESTS + 4))
    assert [plan[WARMUP_REQUESTS + 1 + j][0] for j in range(3)] == [8, 16, 8]
    assert adapter_name(12) == "adapter-00012"


def test_prepare_adapters_hard_links_and_reuse(tmp_path, tiny_model_dir):
    model_cfg = load_model_config(tiny_model_dir)
    traces = [_trace(n_adapters=6, num_requests=5, ranks=(4, 8))]
    plan = adapter_plan(traces)
    adir = prepare_adapters(str(tmp_path), plan, model_cfg, ["q_proj", "v_proj"], distinct=2)
    names = sorted(os.listdir(adir))
    assert names == [adapter_name(g) for g in range(WARMUP_REQUESTS + 6)]
    inodes = {os.stat(os.path.join(adir, n, "adapter_model.safetensors")).st_ino for n in names}
    assert len(inodes) == 4                      # 2 ranks x 2 distinct files
    cfg = json.load(open(os.path.join(adir, adapter_name(WARMUP_REQUESTS + 1), "adapter_config.json")))
    assert cfg["r"] == 8 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert prepare_adapters(str(tmp_path), plan, model_cfg, ["q_proj", "v_proj"], 2) == adir
    with pytest.raises(BenchError, match="has rank 4, this run needs 16"):
        prepare_adapters(str(tmp_path), {0: (16, 0)}, model_cfg, ["q_proj"], 2)


def test_engine_kwargs_per_system():
    traces = [_trace(n_adapters=1000, num_requests=5)]
    base = engine_kwargs(RunOptions("base", traces), "/m", None)
    assert base == dict(model="/m", load_format="dummy", skip_tokenizer_init=True, dtype="float16",
                        max_model_len=1024, gpu_memory_utilization=0.9, seed=0, disable_log_stats=False)
    stock = engine_kwargs(RunOptions("stock", traces), "/m", "/a")
    assert (stock["enable_lora"], stock["max_loras"], stock["max_cpu_loras"], stock["max_lora_rank"],
            stock["lora_target_modules"]) == (True, 128, 1000, 128, ["qkv_proj", "o_proj"])
    kwargs = engine_kwargs(RunOptions("stock", traces, lora_target_modules=None), "/m", "/a")
    assert kwargs["lora_target_modules"] is None
    plugin = engine_kwargs(RunOptions("plugin", traces, slora_config={"loader_threads": 8},
                                      engine_args={"enable_lora": True}), "/m", "/a")
    assert plugin["additional_config"] == {"slora": {"adapter_dir": "/a", "max_lora_rank": 128,
                                                     "loader_threads": 8}}
    assert plugin["enable_lora"] is True and "max_loras" not in plugin
    with pytest.raises(BenchError, match="system must be one of"):
        RunOptions("vllm", traces)


class FakeEngine:
    """Finishes each request `steps` engine steps after it was added, like a tiny server."""

    def __init__(self, steps=3, step_s=0.002):
        self.steps, self.step_s = steps, step_s
        self.live: dict[str, dict] = {}
        self.max_live = 0
        self.aborted: list[str] = []

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        time.sleep(self.step_s)
        done = []
        for rid, r in list(self.live.items()):
            r["left"] -= 1
            if r["first"] is None:
                r["first"], r["first_mono"] = time.time(), time.monotonic()
            if r["left"] == 0:
                del self.live[rid]
                m = SimpleNamespace(arrival_time=r["arrival"], first_token_latency=r["first"] - r["arrival"],
                                    first_token_ts=r["first_mono"], last_token_ts=time.monotonic())
                done.append(SimpleNamespace(request_id=rid.split("-")[0], finished=True, metrics=m,
                                            outputs=[SimpleNamespace(token_ids=[0] * r["max_tokens"])]))
        return done

    def abort_request(self, ids, internal=False):
        assert internal
        self.aborted += ids
        for i in ids:
            self.live.pop(i)


class FakeLLM:
    def __init__(self, **kw):
        self.llm_engine = FakeEngine(**kw)
        self.n = 0
        self.calls: list[list] = []

    def enqueue(self, prompts, params, lora_request, use_tqdm):
        assert use_tqdm is False and len(prompts) == len(params) == len(lora_request)
        self.calls.append(lora_request)
        ids = []
        for p, sp in zip(prompts, params):
            assert sp.ignore_eos and sp.temperature == 0 and not sp.detokenize
            rid = f"{self.n}-abcdef12"
            self.n += 1
            self.llm_engine.live[rid] = dict(left=self.llm_engine.steps, first=None, arrival=time.time(),
                                             max_tokens=sp.max_tokens, prompt=p["prompt_token_ids"])
            ids.append(rid)
        self.llm_engine.max_live = max(self.llm_engine.max_live, len(self.llm_engine.live))
        return ids


def test_all_at_once_stock_requests_carry_cold_adapters():
    trace = _trace(n_adapters=10, num_requests=40, output_len=(2, 9))
    llm = FakeLLM()
    opts = RunOptions("stock", [trace])
    row, recs, cut = run_trace(llm, opts, trace, offset=100, adapters=ServedAdapters("/ad"), vocab_size=256,
                         deadline=time.time() + 60)
    assert not cut and row["completed"] == row["requests"] == 40
    assert len(llm.calls) == 1 and len(llm.calls[0]) == 40
    lr = llm.calls[0][0]
    a = trace.requests[0].adapter
    assert (lr.lora_name, lr.lora_int_id, lr.lora_path) == (
        adapter_name(100 + a), 101 + a, os.path.join("/ad", adapter_name(100 + a)))
    produced = sum(r.output_len for r in trace.requests)
    assert row["output_tok_per_s"] * row["duration_s"] == pytest.approx(produced, rel=1e-2)
    assert 0 < row["ttft_p50_s"] < row["e2e_p50_s"] and row["tpot_p50_s"] > 0
    assert row["distinct_adapters"] == trace.distinct_adapters
    assert all(r["arrival_s"] is not None and r["arrival_s"] < 0.1 for r in recs)


def test_gamma_arrivals_are_honoured_and_base_sends_no_lora():
    trace = _trace(n_adapters=5, num_requests=30, arrival="gamma", rate=150.0)
    llm = FakeLLM()
    t0 = time.time()
    row, recs, cut = run_trace(llm, RunOptions("base", [trace]), trace, 8, None, 256, time.time() + 60)
    assert not cut and row["completed"] == 30
    assert time.time() - t0 >= trace.requests[-1].arrival_s
    assert len(llm.calls) > 5 and all(lr is None for call in llm.calls for lr in call)
    assert row["client_lag_max_s"] < 0.1 and row["slo_attainment"] == 1.0
    assert [r["arrival_s"] for r in recs] == pytest.approx([r.arrival_s for r in trace.requests], abs=1e-5)
    assert row["distinct_adapters"] == 0


def test_closed_loop_keeps_concurrency():
    trace = _trace(n_adapters=5, num_requests=25, arrival="closed", concurrency=4)
    llm = FakeLLM()
    row, _, _ = run_trace(llm, RunOptions("stock", [trace]), trace, 8, ServedAdapters("/ad"), 256, time.time() + 60)
    assert row["completed"] == 25 and llm.llm_engine.max_live == 4


def test_deadline_cuts_and_aborts():
    trace = _trace(n_adapters=5, num_requests=20, arrival="all")
    llm = FakeLLM(steps=10_000)
    row, recs, cut = run_trace(llm, RunOptions("stock", [trace]), trace, 8, ServedAdapters("/ad"), 256,
                               time.time() + 0.2)
    assert cut and row["completed"] == 0 and len(llm.llm_engine.aborted) == 20
    assert row["slo_attainment"] == 0.0


def test_missing_metrics_is_a_clear_error():
    trace = _trace(n_adapters=1, num_requests=1)
    llm = FakeLLM(steps=1)
    step = llm.llm_engine.step
    llm.llm_engine.step = lambda: [SimpleNamespace(**{**o.__dict__, "metrics": None}) for o in step()]
    with pytest.raises(BenchError, match="disable_log_stats"):
        run_trace(llm, RunOptions("stock", [trace]), trace, 8, ServedAdapters("/ad"), 256, time.time() + 60)


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="slora-plugin")
    add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_registers_bench_and_default_traces(tmp_path):
    args = _parse(["bench", "run", "--system", "stock"])
    traces = _traces(args)
    assert [t.spec.n_adapters for t in traces] == [1, 100, 1000, 1000]
    assert [t.spec.arrival for t in traces] == ["all", "all", "all", "gamma"]
    assert traces[0].spec.num_requests == 1000 and traces[0].spec.input_len == (256, 256)
    assert traces[3].spec.input_len == (8, 512) and traces[3].spec.rate == 4
    base = _traces(_parse(["bench", "run", "--system", "base", "--gamma", "none"]))
    assert [t.spec.n_adapters for t in base] == [0]
    custom = _traces(_parse(["bench", "run", "--system", "plugin", "--n-adapters", "2000",
                             "--requests", "50", "--gamma", "requests=20"]))
    assert [(t.spec.n_adapters, t.spec.num_requests) for t in custom] == [(2000, 50), (100, 20)]
    path = str(tmp_path / "t.jsonl")
    assert main(["trace", path, "--n-adapters", "7", "--requests", "9"]) == 0
    from_file = _traces(_parse(["bench", "run", "--system", "stock", "--trace", path, "--trace", "n=3"]))
    assert [t.spec.n_adapters for t in from_file] == [7, 3]
    for sub in ("trace", "plan", "run", "report"):
        with pytest.raises(SystemExit):
            _parse(["bench", sub, "--help"])


def test_cli_run_rejects_bad_flags(capsys):
    assert main(["run", "--system", "stock", "--slora-config", "[1]"]) == 2
    assert "--slora-config: expected a JSON object" in capsys.readouterr().err
    assert main(["run", "--system", "stock", "--trace", "rate=-1,arrival=gamma"]) == 2
    assert "rate > 0" in capsys.readouterr().err
    assert main(["run", "--system", "stock", "--engine-arg", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["run", "--system", "stock", "--n-adapters", "none", "--gamma", "none"]) == 2
    assert "no traces to run" in capsys.readouterr().err


class FakeRunLLM(FakeLLM):
    """Stands in for vllm.LLM in `run()`: records its kwargs and serves like FakeLLM."""

    made: list[dict] = []

    def __init__(self, **kw):
        super().__init__()
        FakeRunLLM.made.append(kw)
        # The engine starts after the adapters are written, with its start method chosen.
        self.env_at_start = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
        ad = kw.get("additional_config", {}).get("slora", {}).get("adapter_dir")
        self.adapters_at_start = sorted(os.listdir(ad)) if ad else None
        eng = self.llm_engine
        eng.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=100, block_size=16))
        eng.loras = {1, 2}
        eng.list_loras = lambda: set(eng.loras)
        eng.remove_lora = lambda i: eng.loras.discard(i)

        # The engine core's pool log, as the runner's logging config tells it to write one.
        cfg = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
        self.pool_log = cfg and json.load(open(cfg))["handlers"]["slora_pool_file"]["filename"]
        self.pokes = 0

    def enqueue(self, prompts, params, lora_request, use_tqdm):
        self.seen_loras = getattr(self, "seen_loras", set()) | {lr.lora_int_id for lr in lora_request if lr}
        return super().enqueue(prompts, params, lora_request, use_tqdm)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        assert not use_tqdm
        if lora_request is None:         # the runner's poke: one token, no adapter
            assert len(prompts) == 1 and params.max_tokens == 1
            self.pokes += 1
            if self.pool_log:            # loads: every adapter seen; one preemption per trace
                loads = len(self.seen_loras if hasattr(self, "seen_loras") else self.warmup)
                with open(self.pool_log, "a") as f:
                    f.write(f"{time.time():.3f} slora page pool: " + repr(
                        {"pages_total": 900, "pages_adapters": 3 * loads, "adapters_resident": loads,
                         "adapter_loads": loads, "adapter_evictions": max(0, loads - 10),
                         "preemptions": self.pokes}) + "\n")
            return
        assert len(prompts) == len(lora_request) == WARMUP_REQUESTS
        self.warmup = lora_request
        self.seen_loras = {lr.lora_int_id for lr in lora_request if lr}

    def get_metrics(self):
        from vllm.v1.metrics.reader import Counter

        return [Counter(name="vllm:num_preemptions", labels={}, value=5 * len(self.calls))]


def _unset(monkeypatch, name):
    monkeypatch.setenv(name, "x")      # so that the test's teardown removes what run() sets
    monkeypatch.delenv(name)


def test_run_writes_rows_per_trace(tmp_path, tiny_model_dir, monkeypatch):
    import vllm

    from slora_plugin.bench.run import run

    monkeypatch.setattr(vllm, "LLM", FakeRunLLM)
    _unset(monkeypatch, "VLLM_WORKER_MULTIPROC_METHOD")
    traces = [_trace(n_adapters=n, num_requests=12, ranks=(4, 8)) for n in (1, 5)]
    opts = RunOptions("stock", traces, model=tiny_model_dir, work_dir=str(tmp_path / "w"),
                      out_dir=str(tmp_path / "out"), command="python benchmarks/throughput.py --system stock")
    path = run(opts)
    data = json.load(open(path))
    assert os.path.basename(path).startswith("throughput-stock-")
    assert data["command"] == opts.command and data["vllm_version"] == vllm.__version__
    assert data["environment"] == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert [w["n_adapters"] for w in data["workload"]] == [1, 5]
    got = [(r["n_adapters"], r["completed"], r["kv_cache_tokens"]) for r in data["rows"]]
    assert got == [(1, 12, 1600), (5, 12, 1600)]
    assert data["rows"][0]["settings"]["max_loras"] == 128 and data["rows"][0]["init_s"] >= 0
    assert [r["preemptions"] for r in data["rows"]] == [5, 5]       # vLLM's counter, per trace
    assert all(r[k] is None for r in data["rows"] for k in POOL_KEYS)  # no pool in stock
    import gzip

    reqs = [json.loads(ln) for ln in gzip.open(path[:-5] + "-requests.jsonl.gz", "rt")]
    assert len(reqs) == 24 and reqs[0]["trace"] == traces[0].spec.label and reqs[-1]["finished"]
    # The roofline's inputs and keys (bench.roofline_rows): every engine step's end, per trace; the
    # model config; each row priced with stock's padded slots, uncalibrated (no base row here).
    steps = [json.loads(ln) for ln in gzip.open(path[:-5] + "-steps.jsonl.gz", "rt")]
    assert [s["trace"] for s in steps] == [t.spec.label for t in traces]
    assert all(s["step_s"] == sorted(s["step_s"]) and len(s["step_s"]) >= 3 for s in steps)
    assert data["model_config"] == json.load(open(os.path.join(tiny_model_dir, "config.json")))
    for r, s in zip(data["rows"], steps):
        assert r["adapter_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and "step_s" not in r
        assert r["roofline_out_tok_per_s"] > 0 and r["pct_of_roofline"] > 0
        assert r["roofline"]["steps_source"] == "recorded" and r["roofline"]["calibrated_on"] is None
        assert r["roofline"]["steps"] == len(s["step_s"])
        assert r["distinct_adapters_per_step_mean"] >= 1 and r["adapter_bytes_per_step_mean"] > 0
    kw = FakeRunLLM.made[-1]
    assert kw["model"] == tiny_model_dir and kw["max_lora_rank"] == 8
    assert sorted(os.listdir(tmp_path / "w" / "adapters")) == [adapter_name(g) for g in range(WARMUP_REQUESTS + 6)]


def test_plugin_engine_starts_spawned_after_adapters_exist(tmp_path, tiny_model_dir, monkeypatch):
    import vllm

    from slora_plugin.bench.run import run

    made = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: made.append(FakeRunLLM(**kw)) or made[-1])
    _unset(monkeypatch, "VLLM_WORKER_MULTIPROC_METHOD")
    _unset(monkeypatch, "VLLM_LOGGING_CONFIG_PATH")
    trace = _trace(n_adapters=3, num_requests=6, ranks=(4,))
    path = run(RunOptions("plugin", [trace], model=tiny_model_dir, work_dir=str(tmp_path / "w"),
                          out_dir=str(tmp_path / "out")))
    assert made[0].env_at_start == "spawn"
    assert made[0].adapters_at_start == [adapter_name(g) for g in range(WARMUP_REQUESTS + 3)]
    data = json.load(open(path))
    row = data["rows"][0]
    distinct = trace.distinct_adapters
    assert (row["adapter_loads"], row["adapter_evictions"]) == (distinct, max(0, 8 + distinct - 10))
    assert (row["pages_total"], row["adapter_pages_peak"], row["adapters_resident_peak"]) == (
        900, 3 * (8 + distinct), 8 + distinct)
    assert row["preemptions"] == 5 and row["pool_preemptions"] == 1 and made[0].pokes == 2
    config = data["environment"]["VLLM_LOGGING_CONFIG_PATH"]  # internal: not in results, gone
    assert os.path.dirname(path) not in config and not os.path.exists(config)
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(
        os.path.basename(path[:-5] + s) for s in (".json", "-requests.jsonl.gz", "-pool.log",
                                                  "-steps.jsonl.gz"))
    assert os.path.isfile(path[:-5] + "-pool.log")
    import glob                          # the report's default pattern finds only results files
    assert glob.glob(os.path.join(os.path.dirname(path), "throughput-*.json")) == [path]
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")     # an explicit choice is kept
    path = run(RunOptions("base", [_trace(n_adapters=0, num_requests=4)], model=tiny_model_dir,
                          work_dir=str(tmp_path / "w"), out_dir=str(tmp_path / "out2")))
    assert made[1].env_at_start == "fork"
    assert json.load(open(path))["environment"] == {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}


def test_compressed_plugin_run_serves_collection_members(tmp_path, tiny_model_dir, monkeypatch):
    import vllm

    from slora_plugin.bench.run import run

    made = []
    monkeypatch.setattr(vllm, "LLM", lambda **kw: made.append(FakeRunLLM(**kw)) or made[-1])
    _unset(monkeypatch, "VLLM_LOGGING_CONFIG_PATH")
    trace = _trace(n_adapters=3, num_requests=6, ranks=(2, 4))
    path = run(RunOptions("plugin", [trace], model=tiny_model_dir, work_dir=str(tmp_path / "w"),
                          out_dir=str(tmp_path / "out"), compress_rank=4))
    # the engine's adapter directory holds only the collection; requests name its members
    assert made[0].adapters_at_start == ["coll"]
    assert made[0].warmup[0].lora_name == "coll/" + adapter_name(0)
    assert made[0].warmup[0].lora_path.endswith(os.path.join("served", "coll", adapter_name(0)))
    row = json.load(open(path))["rows"][0]
    assert row["compressed"]["rank_k"] == 4 and row["compressed"]["clusters"] == 1
    assert 0 <= row["compressed"]["rel_error_mean"] <= row["compressed"]["rel_error_max"]
    # priced as compressed: every distinct adapter reads its 4 x 4 cores on q,k,v,o of each layer
    layers = json.load(open(os.path.join(tiny_model_dir, "config.json")))["num_hidden_layers"]
    per_adapter = 4 * layers * 4 * 4 * 2
    assert row["adapter_bytes_per_step_mean"] == pytest.approx(
        row["distinct_adapters_per_step_mean"] * per_adapter, rel=0.02)
    with pytest.raises(BenchError, match="--compress-rank needs --system plugin"):
        RunOptions("stock", [trace], compress_rank=4)


def test_plugin_run_needs_the_entry_point(monkeypatch):
    import importlib.metadata

    from slora_plugin.bench.run import check_plugin_installed

    check_plugin_installed()   # installed editable in this environment
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(BenchError, match="not installed as a vllm.general_plugins entry point"):
        check_plugin_installed()


class ProfilingLLM(FakeLLM):
    """FakeLLM with vLLM's start/stop_profile, recording when (wall clock) they came."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.profile_calls: list[tuple[str, float]] = []

    def start_profile(self, prefix=None):
        assert prefix == PROFILE_PREFIX
        self.profile_calls.append(("start", time.time()))

    def stop_profile(self):
        self.profile_calls.append(("stop", time.time()))


def _profiled_trace(window):
    trace = _trace(n_adapters=5, num_requests=20, arrival="all")
    llm = ProfilingLLM(steps=60, step_s=0.005)            # about 0.3 s of steps
    row, _, cut = run_trace(llm, RunOptions("stock", [trace]), trace, 8, ServedAdapters("/ad"), 256,
                            time.time() + 60, ProfileWindow.parse(window))
    assert not cut and row["completed"] == 20
    return row, llm.profile_calls


def test_run_trace_profiles_the_window_on_the_trace_clock():
    row, calls = _profiled_trace("0:0.1:0.1")
    assert [c for c, _ in calls] == ["start", "stop"]
    assert 0.09 <= calls[1][1] - calls[0][1] < 0.2
    p = row["profile"]
    assert row["profiled"] is True and p["requested"] == "0:0.1:0.1"
    assert 0.1 <= p["start_s"] < 0.2 and 0.1 <= p["stop_s"] - p["start_s"] < 0.2 and p["stop_call_s"] >= 0
    row, calls = _profiled_trace("0:0.1:100")              # the trace ends first: stopped at its end
    assert [c for c, _ in calls] == ["start", "stop"]
    assert row["profile"]["stop_s"] == pytest.approx(row["duration_s"], abs=0.05)
    row, calls = _profiled_trace("0:50:1")                 # never reached: nothing profiled
    assert calls == [] and row["profiled"] is False
    assert "before the profile window's start (50 s): nothing profiled" in row["profile"]["error"]
    trace = _trace(n_adapters=5, num_requests=5)
    unprofiled, _, _ = run_trace(ProfilingLLM(), RunOptions("stock", [trace]), trace, 8, ServedAdapters("/ad"), 256,
                                 time.time() + 60)
    assert "profiled" not in unprofiled and "profile" not in unprofiled


def test_cli_rejects_bad_profile_windows(capsys):
    small = ["run", "--system", "stock", "--n-adapters", "1,2", "--gamma", "none", "--requests", "5"]
    assert main([*small, "--profile", "2:12"]) == 2
    assert "--profile: expected INDEX:START_S:DURATION_S" in capsys.readouterr().err
    assert main([*small, "--profile", "0:5:0"]) == 2
    assert "DURATION_S > 0" in capsys.readouterr().err
    assert main([*small, "--profile", "2:1:1"]) == 2
    assert "--profile: trace index 2, but this command runs 2 trace(s) (0..1)" in capsys.readouterr().err
    assert _parse(["bench", "run", "--system", "plugin", "--profile", "1:12:6"]).profile == "1:12:6"


class ProfilingRunLLM(FakeRunLLM):
    """FakeRunLLM whose stop_profile writes what vLLM's engine core writes: a gzip Chrome trace
    named after the prefix and the worker's ranks, then the key-averages table."""

    def start_profile(self, prefix=None):
        self.prefix = prefix

    def stop_profile(self):
        import gzip

        out = FakeRunLLM.made[-1]["profiler_config"]["torch_profiler_dir"]
        os.makedirs(out, exist_ok=True)
        events = [{"ph": "X", "cat": "kernel", "name": "_shrink_kernel", "ts": 0, "dur": 30, "pid": 0, "tid": 7},
                  {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_hsh_TNN", "ts": 30, "dur": 50, "pid": 0, "tid": 7},
                  {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 100,
                   "dur": 20, "pid": 0, "tid": 9, "args": {"bytes": 4096}}]
        with gzip.open(os.path.join(out, f"{self.prefix}_dp0_pp0_tp0.{time.time_ns()}.pt.trace.json.gz"), "wt") as f:
            json.dump({"traceEvents": events}, f)
        with open(os.path.join(out, "profiler_out_0.txt"), "w") as f:
            f.writelines(f"row {i}\n" for i in range(300))


def test_run_with_profile_summarizes_the_window(tmp_path, tiny_model_dir, monkeypatch):
    import vllm

    from slora_plugin.bench.report import load_results, markdown_table, write_report
    from slora_plugin.bench.run import run

    monkeypatch.setattr(vllm, "LLM", ProfilingRunLLM)
    _unset(monkeypatch, "VLLM_WORKER_MULTIPROC_METHOD")
    traces = [_trace(n_adapters=n, num_requests=12, ranks=(4, 8)) for n in (1, 5)]
    out = tmp_path / "out"
    path = run(RunOptions("stock", traces, model=tiny_model_dir, work_dir=str(tmp_path / "w"),
                          out_dir=str(out), profile=ProfileWindow(1, 0, 30)))
    kw = FakeRunLLM.made[-1]
    prof_dir = kw["profiler_config"]["torch_profiler_dir"]
    assert kw["profiler_config"] == {"profiler": "torch", "torch_profiler_dir": prof_dir,
                                     "torch_profiler_with_stack": False}
    assert os.path.isabs(prof_dir) and prof_dir.startswith(str(tmp_path / "w" / "profile-"))
    # What the real LLM does with the dict (LLM(profiler_config=dict) drops unknown keys silently).
    import inspect

    from vllm.config import ProfilerConfig

    cfg = ProfilerConfig(**kw["profiler_config"])
    assert (cfg.profiler, cfg.torch_profiler_dir, cfg.torch_profiler_with_stack) == ("torch", prof_dir, False)
    from vllm.entrypoints.llm import LLM

    assert "profiler_config" in inspect.signature(LLM.__init__).parameters
    assert all(callable(getattr(LLM, m, None)) for m in ("start_profile", "stop_profile"))
    data = json.load(open(path))
    plain, profiled = data["rows"]
    assert "profiled" not in plain and profiled["profiled"] is True
    assert "profiler_config" not in profiled["settings"]
    assert data["engine_kwargs"]["profiler_config"]["profiler"] == "torch"
    p = profiled["profile"]
    assert p["requested"] == "1:0:30" and p["start_s"] == 0 and p["stop_s"] >= 0
    assert p["trace_file"].startswith(prof_dir) and p["trace_file"].endswith(".pt.trace.json.gz")
    assert (p["window_s"], p["gpu_busy_s"], p["kernel_launches"]) == pytest.approx((120e-6, 100e-6, 2))
    assert p["categories"]["lora"]["time_s"] == pytest.approx(30e-6)
    assert p["categories"]["memcpy_htod"]["bytes"] == 4096
    table = out / p["table_file"]
    assert p["table_file"] == os.path.basename(path)[:-5] + "-profile.txt"
    assert len(table.read_text().splitlines()) == 201          # 200 lines and the cut note
    assert not any(".pt.trace." in f for f in os.listdir(out))  # the raw trace stays in work_dir
    md = markdown_table(load_results([path]))
    row_lines = [ln for ln in md.splitlines() if ln.startswith("| ") and ": all-at-once" in ln.split("|")[1]]
    assert sum("PROFILED" in ln for ln in row_lines) == 1
    assert "GPU time in the profiled windows" in md and "`Memcpy HtoD (Pinned -> Device)`" not in md
    assert "`nvjet_sm90_hsh_TNN` (50.0%)" in md
    report = write_report([path], str(tmp_path / "r"))
    assert set(report) == {"table", "throughput_plot", "ttft_cdf_plot", "roofline_plot"}  # rows have rooflines
