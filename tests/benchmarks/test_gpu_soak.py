"""The CPU half of benchmarks/gpu_soak.py (the serving soak of issue 17, run on the H100): its
arrival and popularity generators, the outcome of an answer, the result's accounting, the chaos
operations on a real adapter directory (hard-linked as `adapters synth --distinct` writes it),
the solo-replay comparison, the pool and memory checks, and its load generator against a fake
server that streams, fails with and without a reason, and is hung up on."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_soak", os.path.join(REPO, "benchmarks", "gpu_soak.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_soak"] = module
    spec.loader.exec_module(module)
    return module


soak = _load_script()


def test_reuses_gpu_serve_helpers():
    assert soak.serve.Server.__module__ == "gpu_serve" and soak.serve.http.__module__ == "gpu_serve"


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    times = soak.poisson_arrivals(50.0, 200.0, random.Random(1))
    assert abs(len(times) - 10_000) < 4 * 100  # Poisson: sd = sqrt(10,000)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.02) < 0.001
    assert abs(sum(g > mean for g in gaps) / len(gaps) - 1 / 2.718281828) < 0.02  # P(gap > mean) = 1/e
    with pytest.raises(ValueError):
        soak.poisson_arrivals(0, 1, random.Random(0))


def test_popularity_is_a_power_law_and_takes_new_names():
    pop = soak.Popularity([f"a{i}" for i in range(100)], alpha=1.0)
    rng = random.Random(2)
    draws = [pop.draw(rng) for _ in range(60_000)]
    counts = {n: draws.count(n) for n in ("a0", "a1", "a3")}
    assert 1.8 < counts["a0"] / counts["a1"] < 2.2 and 3.5 < counts["a0"] / counts["a3"] < 4.5
    pop.add("new")
    assert pop.names[-1] == "new" and "new" in {pop.draw(rng) for _ in range(200_000)}


def test_plans_mix_base_stream_and_hang_ups():
    mix = soak.Mix(alpha=1.0, base_fraction=0.1, stream_fraction=0.5, disconnect_fraction=0.2)
    pop = soak.Popularity(["x", "y"], 1.0)
    rng = random.Random(3)
    plans = [soak.plan_request(float(i), pop, mix, rng) for i in range(4000)]
    base = sum(p.model == soak.SERVED_NAME for p in plans) / len(plans)
    streamed = [p for p in plans if p.stream]
    hang = [p for p in streamed if p.disconnect_after is not None]
    assert 0.08 < base < 0.12 and 0.46 < len(streamed) / len(plans) < 0.54
    assert 0.16 < len(hang) / len(streamed) < 0.24
    assert all(1 <= p.disconnect_after <= max(1, p.max_tokens // 2) for p in hang)
    assert all(p.stream for p in plans if p.disconnect_after is not None)
    assert all(mix.prompt_len[0] <= len(p.prompt) <= mix.prompt_len[1] for p in plans)
    body = soak.request_body(plans[0], logprobs=2)
    assert body["temperature"] == 0.0 and body["return_token_ids"] and body["logprobs"] == 2
    assert all(p.model == soak.SERVED_NAME for p in (soak.plan_request(0, None, mix, rng) for _ in range(20)))


def test_request_body_is_a_vllm_completion_request():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    p = soak.Planned(0.0, "a", (5, 6, 7), 4, True, 2)
    req = CompletionRequest(**soak.request_body(p, logprobs=2))
    assert req.stream and req.max_tokens == 4 and req.ignore_eos and req.return_token_ids


@pytest.mark.parametrize("args,outcome", [
    (("a", 200, None, "length", 8, 8), "completed"),
    (("a", 200, None, "length", 7, 8), "failed_without_reason"),
    (("a", 200, None, "error", 0, 8), "failed_without_reason"),
    (("a", 400, "adapter 'a', file adapter_model.safetensors: cannot be read", None, 0, 8), "failed_with_reason"),
    (("a", 404, "The model `a` does not exist.", None, 0, 8), "failed_with_reason"),
    (("a", 400, "LoRA adapter 'b' was found but could not be loaded: ...", None, 0, 8), "failed_without_reason"),
    (("ab", 400, "adapter 'a': x", None, 0, 8), "failed_without_reason"),  # names another
    (("a", 500, "Internal server error", None, 0, 8), "failed_without_reason"),
    (("base", 400, "adapter 'base': x", None, 0, 8), "failed_without_reason"),  # the base model
    (("a", None, None, None, 0, 8), "no_answer"),
])
def test_classify(args, outcome):
    assert soak.classify(*args) == outcome


def _rec(t, outcome, latency=None, model="a", touched=False, ttft=None):
    return soak.Record(t, model, False, outcome, 200, latency_s=latency, ttft_s=ttft, touched=touched)


def test_tally_and_windows():
    records = [_rec(i, "completed", latency=float(i + 1), ttft=0.1) for i in range(10)]
    records += [_rec(3, "failed_with_reason", touched=True), _rec(4, "failed_with_reason"),
                _rec(5, "disconnected"), _rec(40, "failed_without_reason", model="base"),
                _rec(41, "no_answer", touched=True)]
    t = soak.tally(records)
    assert t["requests"] == 15 and t["completed"] == 10 and t["failed_with_reason"] == 2
    assert t["failed_without_reason"] == 1 and t["disconnected"] == 1 and t["no_answer"] == 1
    assert t["failed_untouched"] == 1 and t["failed_base_model"] == 1
    assert t["p50_latency_s"] == 5.0 and t["p99_latency_s"] == 10.0 and t["p50_ttft_s"] == 0.1
    w = soak.latency_windows(records, 30.0)
    assert [x["requests"] for x in w] == [13, 2] and w[0]["completed"] == 10 and w[1]["p50_latency_s"] is None
    assert soak.percentile([], 50) is None and soak.percentile([3.0], 99) == 3.0


def test_sustained():
    ok = [_rec(i * 0.1, "completed", latency=1.0) for i in range(100)]
    assert soak.sustained(ok, slo_s=5.0)
    assert not soak.sustained(ok, slo_s=0.5)
    assert not soak.sustained(ok[:50] + [_rec(9, "no_answer")] * 50, slo_s=5.0)
    assert not soak.sustained([], slo_s=5.0)
    # fewer Poisson arrivals than rate x window (by chance) all served: sustained
    few = soak.poisson_arrivals(4.0, 30.0, random.Random(0))
    assert len(few) < 0.9 * 4.0 * 30.0
    assert soak.sustained([_rec(t, "completed", latency=1.0) for t in few], slo_s=5.0)
    # the mix's hang-ups (5 % of requests: half streamed, a tenth of those hung up) are the
    # client's doing: a server that completes every other request sustains the rate
    hung = [soak.Record(i * 0.1, "base", True, "disconnected", 200, latency_s=0.1) for i in range(5)]
    assert soak.sustained(ok[:95] + hung, slo_s=5.0)
    assert not soak.sustained(hung, slo_s=5.0)


@pytest.fixture
def fleet(tmp_path, tiny_dims):
    """A synth directory as `adapters synth --distinct 2` writes it (hard links) and its store."""
    from slora_plugin.adapters.cli import synthesize
    from slora_plugin.adapters.store import AdapterStore

    root = str(tmp_path / "adapters")
    names = synthesize(root, 8, [4, 8], tiny_dims, ["q_proj", "v_proj"], distinct=2)
    store = AdapterStore(tiny_dims, 4096, torch.float16, adapter_dir=root, max_rank=64,
                         host_cache_bytes=1 << 24, loader_threads=1)
    yield root, names, store
    store.close()


def _twin(root, names, name):
    from slora_plugin.adapters.peft_format import WEIGHTS_NAME

    ino = os.stat(os.path.join(root, name, WEIGHTS_NAME)).st_ino
    return next(n for n in names if n != name and os.stat(os.path.join(root, n, WEIGHTS_NAME)).st_ino == ino)


def test_chaos_operations_on_a_real_directory(fleet, tiny_dims):
    from slora_plugin.adapters.errors import AdapterError, AdapterNotFoundError

    root, names, store = fleet
    pop = soak.Popularity(names, 1.0)
    chaos = soak.Chaos(root, tiny_dims, random.Random(0), pop)
    t0 = 0.0
    victim = names[0]
    twin = _twin(root, names, victim)
    chaos.truncate(victim, t0)
    with pytest.raises(AdapterError, match="past the end of the file"):
        store.get(victim)
    with store.get(twin) as lease:  # its hard-linked twin keeps its weights
        assert lease.spec.name == twin
    chaos.replace(names[1], t0)
    assert set(store.spec(names[1]).ranks.values()) <= {8, 16, 32, 64}
    with store.get(names[1]):
        pass
    chaos.delete(names[2], t0)
    with pytest.raises(AdapterNotFoundError):
        store.spec(names[2])
    added = chaos.add(t0)
    assert pop.names[-1] == added and store.spec(added).num_pages > 0
    assert chaos.counts() == {"delete": 1, "truncate": 1, "replace": 1, "add": 1}
    assert set(chaos.touched) == {victim, names[1], names[2], added}
    assert chaos.was_touched(victim, before=float("inf")) and not chaos.was_touched(twin, float("inf"))
    assert not any(n.startswith(".chaos") for n in os.listdir(root))  # staging cleaned up
    assert store.index.scan() == sorted(set(names) - {names[2]} | {added})
    for _ in range(20):  # random steps never raise, whatever is left
        chaos.step(t0)


def test_chaos_thread_stops(fleet, tiny_dims):
    import threading

    root, names, _ = fleet
    chaos = soak.Chaos(root, tiny_dims, random.Random(1), soak.Popularity(names, 1.0))
    stop, errors = threading.Event(), []
    th = threading.Thread(target=soak.run_chaos, args=(chaos, 0.01, stop, 0.0, errors))
    th.start()
    import time

    time.sleep(0.5)
    stop.set()
    th.join(5)
    assert not th.is_alive() and sum(chaos.counts().values()) > 3 and errors == []


def test_synth_adapters_runs_the_cli(tmp_path, tiny_model_dir):
    names = soak.synth_adapters(str(tmp_path / "a"), tiny_model_dir, 6, 2)
    assert len(names) == 6 and all(os.path.isfile(tmp_path / "a" / n / "adapter_config.json") for n in names)


def test_synth_adapters_never_reuses_a_chaos_damaged_directory(tmp_path, tiny_model_dir, tiny_dims):
    """A second soak in the same work dir (a retry in the same session) gets the adapters whole:
    the first one's chaos truncated, deleted and added some, whose failures would count as
    `failed_untouched` in a run whose chaos never touched them."""
    from slora_plugin.adapters.peft_format import WEIGHTS_NAME

    root = str(tmp_path / "a")
    names = soak.synth_adapters(root, tiny_model_dir, 6, 2)
    weights = os.path.join(root, names[0], WEIGHTS_NAME)
    size = os.path.getsize(weights)
    chaos = soak.Chaos(root, tiny_dims, random.Random(0), soak.Popularity(names, 1.0))
    chaos.truncate(names[0], 0.0)
    chaos.add(0.0)  # the count stays at 6: a count check alone would keep the damage
    chaos.delete(names[1], 0.0)
    again = soak.synth_adapters(root, tiny_model_dir, 6, 2)
    assert again == names and os.path.getsize(weights) == size


def test_compare_tokens():
    top = [{"token_id:1": -0.1}, {"token_id:2": -0.50, "token_id:9": -0.51}, {"token_id:3": -0.1}]
    assert soak.compare_tokens([1, 2, 3], [1, 2, 3], None, 0.02) == "equal"
    assert soak.compare_tokens([1, 9, 4], [1, 2, 3], top, 0.02) == "near_tie"
    assert soak.compare_tokens([1, 9, 4], [1, 2, 3], top, 0.001) == "mismatch"
    assert soak.compare_tokens([1, 7, 4], [1, 2, 3], top, 0.02) == "mismatch"  # not in solo's top 2
    assert soak.compare_tokens([1, 2], [1, 2, 3], top, 0.02) == "mismatch"
    assert soak.compare_tokens([1, 9, 4], [1, 2, 3], None, 0.02) == "mismatch"


def test_replay_sample_skips_touched_and_unfinished(tiny_dims, tmp_path):
    records = [soak.Record(0, m, False, o, 200, token_ids=[1]) for m, o in
               (("a", "completed"), ("b", "completed"), ("a", "failed_with_reason"), ("c", "completed"))]
    records.append(soak.Record(0, "a", True, "disconnected", 200, token_ids=[1]))
    plans = {i: soak.Planned(0, r.model, (1,), 1, False, None) for i, r in enumerate(records)}
    os.makedirs(tmp_path / "d")
    chaos = soak.Chaos(str(tmp_path / "d"), tiny_dims, random.Random(0), soak.Popularity(["a"], 1.0))
    chaos.touched["b"] = 0.0
    assert soak.replay_sample(records, plans, chaos, 10, 0) == [0, 3]
    assert len(soak.replay_sample(records, plans, None, 1, 0)) == 1


def _metrics(total, free, kv, adapters, running=0, waiting=0):
    return (f'slora:pages_total{{engine="0"}} {total}\nslora:pages_free{{engine="0"}} {free}\n'
            f'slora:pages_kv{{engine="0"}} {kv}\nslora:pages_adapters{{engine="0"}} {adapters}\n'
            f"vllm:num_requests_running {running}\nvllm:num_requests_waiting {waiting}\n")


def test_pool_accounting():
    text = _metrics(100, 70, 0, 30)
    ok = soak.pool_accounting(text, 0.0, 0.0)
    assert ok["ok"] and ok["leaked_pages"] == 0 and ok["sum_exact"]
    leak = soak.pool_accounting(_metrics(100, 65, 5, 30), 0.0, 0.0)
    assert not leak["ok"] and leak["leaked_pages"] == 5
    busy = soak.pool_accounting(_metrics(100, 65, 5, 30), 1.0, 0.0)
    assert not busy["ok"] and busy["leaked_pages"] is None
    assert not soak.pool_accounting(_metrics(100, 60, 0, 30), 0.0, 0.0)["ok"]  # 10 pages unaccounted
    assert not soak.pool_accounting("vllm:num_requests_running 0\n", 0.0, 0.0)["ok"]


def test_memory_check_and_group_memory():
    gib = 2**30
    flat = [{"t_s": t, "rss_bytes": 10 * gib, "pinned_bytes": 0} for t in range(0, 600, 5)]
    assert soak.memory_check(flat, 60, 48 * gib, 4 * gib)["ok"]
    leak = [{"t_s": t, "rss_bytes": 10 * gib + t * 20 * 2**20, "pinned_bytes": 0} for t in range(0, 600, 5)]
    assert not soak.memory_check(leak, 60, 48 * gib, 4 * gib)["ok"]  # grows past the host cache
    assert not soak.memory_check(flat, 60, 8 * gib, 4 * gib)["ok"]
    assert not soak.memory_check([], 60, 8 * gib, 4 * gib)["ok"]
    mine = soak.group_memory_kib(os.getpgid(0))
    assert mine["VmRSS"] > 0


def test_parse_events():
    lines = ['data: {"choices": [{"token_ids": [1]}]}\n', "\n", ": keep-alive\n",
             'data: {"error": {"message": "x", "code": 400}}\n', "data: [DONE]\n", 'data: {"late": 1}\n']
    assert list(soak.parse_events(lines)) == [{"choices": [{"token_ids": [1]}]},
                                              {"error": {"message": "x", "code": 400}}]


class _FakeServer:
    """An aiohttp server answering /v1/completions like `vllm serve` with the plugin: tokens
    (streamed as SSE chunks or in one body); 400 naming the adapter for "bad-*"; a stream
    error event naming it for "late-*"; 500 "Internal server error" for "boom"."""

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        model, n = body["model"], body["max_tokens"]
        if model.startswith("bad-"):
            return web.json_response({"error": {"message": f"adapter '{model}', file x: bad", "type":
                                                "BadRequestError", "param": "model", "code": 400}}, status=400)
        if model == "boom":
            return web.json_response({"error": {"message": "Internal server error", "code": 500}}, status=500)
        if not body["stream"]:
            return web.json_response({"choices": [{"finish_reason": "length", "token_ids": list(range(n))}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                if model.startswith("late-") and i == 1:
                    err = {"error": {"message": f"adapter '{model}': weights", "code": 400}}
                    await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                    break
                c = {"choices": [{"token_ids": [i], "finish_reason": "length" if i == n - 1 else None}]}
                await resp.write(f"data: {json.dumps(c)}\n\n".encode())
                await asyncio.sleep(0.005)
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            self.hung_up += 1
        return resp

    async def start(self):
        from aiohttp import web

        self.hung_up = 0
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


def test_load_generator_against_a_fake_server():
    models = ["good", "bad-x", "late-y", "boom", soak.SERVED_NAME]
    plans = [soak.Planned(0.01 * i, m, (1, 2), 6, stream, hang)
             for i, (m, stream, hang) in enumerate(
                 [(m, s, None) for m in models for s in (False, True)] + [("good", True, 2)])]

    async def go():
        fake = _FakeServer()
        url = await fake.start()
        try:
            records = await soak.run_load(url, lambda t, rng: plans[int(round(t * 100))],
                                          [p.t for p in plans], seed=0, timeout_s=10)
        finally:
            await fake.runner.cleanup()
        return records

    records = asyncio.run(go())
    got = [(r.model, r.stream, r.outcome) for r in records]
    assert got == [("good", False, "completed"), ("good", True, "completed"),
                   ("bad-x", False, "failed_with_reason"), ("bad-x", True, "failed_with_reason"),
                   ("late-y", False, "completed"), ("late-y", True, "failed_with_reason"),
                   ("boom", False, "failed_without_reason"), ("boom", True, "failed_without_reason"),
                   (soak.SERVED_NAME, False, "completed"), (soak.SERVED_NAME, True, "completed"),
                   ("good", True, "disconnected")]
    assert records[1].token_ids == list(range(6)) and records[1].ttft_s is not None
    assert records[5].status == 400 and "late-y" in records[5].message
    assert all(r.latency_s is not None for r in records)


class _OddStreamServer(_FakeServer):
    """Streams an event of a shape the client does not expect for "odd"."""

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        if body["model"] != "odd":
            return await super().handle(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"error": "not an object"}\n\ndata: [DONE]\n\n')
        return resp


def test_an_unforeseen_answer_fails_its_request_not_the_load():
    plans = [soak.Planned(0.0, "odd", (1, 2), 4, True, None), soak.Planned(0.01, "good", (1, 2), 4, False, None)]

    async def go():
        fake = _OddStreamServer()
        url = await fake.start()
        try:
            return await soak.run_load(url, lambda t, rng: plans[int(round(t * 100))], [p.t for p in plans],
                                       seed=0, timeout_s=10)
        finally:
            await fake.runner.cleanup()

    odd, good = asyncio.run(go())
    assert odd.outcome == "failed_without_reason" and "unreadable answer" in odd.message
    assert good.outcome == "completed"


def test_open_files_limit_is_raised(tmp_path):
    """The load's sockets: thousands in flight when the server falls behind, past a soft limit
    of 1024 (the refused connections would count as the server's no_answer)."""
    import subprocess

    code = ("import resource, sys; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            f"sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r}); import gpu_soak; "
            "got = gpu_soak.raise_open_files_limit(); "
            "want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard); "
            "print(got, want); assert got == want")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_soak_command_parses_into_vllm_serve_args(tmp_path, tiny_model_dir, cpu_platform):
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    cmd = ServeSubcommand()
    cmd.subparser_init(parser.add_subparsers(dest="subparser"))
    for adapter_dir in (str(tmp_path), None):
        argv = soak.soak_command(tiny_model_dir, adapter_dir, 8000, 2048, 0.9)
        args = parser.parse_args(argv[argv.index("serve"):])
        assert args.return_tokens_as_token_ids and args.skip_tokenizer_init
        if adapter_dir is None:
            assert args.additional_config in (None, {})
        else:
            assert args.additional_config["slora"]["adapter_dir"] == adapter_dir


def test_verdict_and_result_fields():
    good = {"server_crashes": 0, "failed_without_reason": 0, "no_answer": 0, "failed_untouched": 0,
            "failed_base_model": 0, "token_mismatches": 0, "leaked_pages": 0, "pool": {"ok": True},
            "memory": {"ok": True}, "replay": {"equal": 5, "mismatch": 0, "unanswered": 0, "examples": []}}
    assert soak.verdict(good) == []
    # replays that were not answered checked nothing: not a silent pass
    unanswered = {**good, "replay": {"equal": 0, "mismatch": 0, "unanswered": 5, "examples": [{"solo": "400"}]}}
    assert [f for f in soak.verdict(unanswered) if f.startswith("replay unanswered = 5")]
    assert soak.verdict({**good, "failed_without_reason": 2}) == ["failed_without_reason = 2 (want 0)"]
    assert any("leaked_pages" in f for f in soak.verdict({**good, "leaked_pages": None}))


def test_main_writes_a_result_when_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(soak.serve, "missing_modules", lambda names: ["uvicorn"])
    out = tmp_path / "soak.json"
    assert soak.main(["--work-dir", str(tmp_path / "w"), "--out", str(out), "--rate", "5"]) == 1
    data = json.loads(out.read_text())
    assert data["failed_checks"][0].startswith("RuntimeError: missing modules") and data["duration_s"] == 600.0
    assert {"date", "device"} <= set(data)


class _FakeVLLMServer:
    """Stands in for `gpu_serve.Server` + `vllm serve`: a threaded HTTP server answering
    /health, /metrics (an idle, exact pool) and /v1/completions (tokens 0..n-1, streamed as SSE
    or in one body), in this process's group."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _send(self, status, text, ctype="application/json"):
                raw = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, _metrics(100, 80, 0, 20) if self.path == "/metrics" else "", "text/plain")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = body["max_tokens"]
                if max(body["prompt"]) >= 256:  # the tiny model's vocabulary
                    return self._send(400, json.dumps({"error": {"message": "token id out of vocabulary"}}))
                if not body.get("stream"):
                    c = {"finish_reason": "length", "token_ids": list(range(n))}
                    if body.get("logprobs"):
                        c["logprobs"] = {"top_logprobs": [{f"token_id:{i}": -0.1} for i in range(n)]}
                    return self._send(200, json.dumps({"choices": [c]}))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i in range(n):
                        c = {"choices": [{"token_ids": [i], "finish_reason": "length" if i == n - 1 else None}]}
                        self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        pgid = os.getpgid(0)
        self.proc = type("P", (), {"pid": pgid, "poll": lambda self: None})()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def log_text(self):
        return "fake server log"


def _serve_fake(monkeypatch, fake: _FakeVLLMServer, ready: bool = True) -> list[tuple[list[str], float]]:
    """`soak.start_server` answers with `fake` (started, or exited when not `ready`); the
    (command, start timeout) of each start, in order."""
    starts: list[tuple[list[str], float]] = []

    def start_server(cmd, env, log_path, cwd, start_timeout_s):
        starts.append((cmd, start_timeout_s))
        return fake, fake.url, soak.serve.Check("ready", "200", "200" if ready else "exited", ready)

    monkeypatch.setattr(soak, "start_server", start_server)
    return starts


def test_soak_end_to_end_on_a_fake_server(tmp_path, tiny_model_dir, monkeypatch):
    """The whole soak (synth through the CLI, load, chaos, replay, pool and memory checks,
    result file, plot) in a few seconds against the fake server."""
    fake = _FakeVLLMServer()
    starts = _serve_fake(monkeypatch, fake)
    out = tmp_path / "soak-test.json"
    rc = soak.main(["--work-dir", str(tmp_path / "w"), "--out", str(out), "--rate", "40",
                    "--duration-s", "3", "--model-config", tiny_model_dir, "--adapters", "12",
                    "--distinct", "2", "--chaos-every-s", "0.2", "--replay", "5", "--warmup-s", "0",
                    "--window-s", "1", "--prompt-len", "2-4", "--output-len", "2-6",
                    "--monitor-every-s", "0.5"])
    data = json.loads(out.read_text())
    assert rc == 0, data["failed_checks"]
    for key in ("date", "device", "duration_s", "rate", "requests", "completed", "failed_with_reason",
                "failed_without_reason", "server_crashes", "leaked_pages", "token_mismatches",
                "p50_latency_s", "p99_latency_s"):
        assert key in data, key
    assert data["rate"] == 40.0 and data["requests"] > 60 and data["server_crashes"] == 0
    assert data["completed"] + data["disconnected"] == data["requests"]
    assert data["replay"]["checked"] == 5 and data["replay"]["equal"] == 5
    assert sum(data["chaos"]["ops"].values()) >= 5 and data["adapters"] == 12
    assert data["pool"]["ok"] and data["memory"]["ok"] and len(data["latency_windows"]) >= 3
    assert len(data["memory_samples"]) >= 4 and data["health_failures"] == 0
    assert "--additional-config" in starts[0][0]


def _measure_args(tmp_path, *extra):
    return soak.parse_args(["--work-dir", str(tmp_path / "w"), "--probe-s", "1", "--slo-s", "5",
                            "--prompt-len", "2-4", "--output-len", "2-6", *extra])


def test_stock_rate_is_kept_as_each_probe_ends(tmp_path, monkeypatch):
    """gpu_run.sh kills soak-rate at 540 s: the probes done by then must stay in the result (the
    soak step reads stock_rate.rate from it), so `stock` is filled as each probe ends."""
    fake = _FakeVLLMServer()
    _serve_fake(monkeypatch, fake)
    real_run_load, calls = soak.run_load, []

    async def killed_in_the_second_probe(*a, **kw):
        calls.append(kw["timeout_s"])
        if len(calls) == 2:
            raise SystemExit(143)  # what _terminate raises on SIGTERM
        return await real_run_load(*a, **kw)

    monkeypatch.setattr(soak, "run_load", killed_in_the_second_probe)
    stock: dict = {}
    mix = soak.Mix(prompt_len=(2, 4), output_len=(2, 6), vocab_size=256)
    with pytest.raises(SystemExit):
        soak.measure_stock_rate(str(tmp_path), "m", [4.0, 8.0, 16.0], 1.0, mix, 5.0, _measure_args(tmp_path),
                                stock, str(tmp_path / "log"))
    assert stock["rate"] == 4.0 and [p["rate"] for p in stock["probes"]] == [4.0]
    assert calls == [15.0, 15.0]  # a probe's requests wait 3 x the SLO at most (its drain is bounded)


def test_stock_rate_stops_at_the_deadline_and_names_a_failed_start(tmp_path, monkeypatch):
    import time

    fake = _FakeVLLMServer()
    starts = _serve_fake(monkeypatch, fake)
    real_run_load = soak.run_load

    async def probe_of_2_s(*a, **kw):
        records = await real_run_load(*a, **kw)
        await asyncio.sleep(2.0)
        return records

    monkeypatch.setattr(soak, "run_load", probe_of_2_s)
    mix = soak.Mix(prompt_len=(2, 4), output_len=(2, 6), vocab_size=256)
    stock: dict = {}
    # room for one probe (1 s + its 15 s of request timeout), not for a second one 2 s later
    soak.measure_stock_rate(str(tmp_path), "m", [4.0, 8.0], 1.0, mix, 5.0, _measure_args(tmp_path), stock,
                            str(tmp_path / "log"), deadline=time.monotonic() + 17.0)
    assert [p["rate"] for p in stock["probes"]] == [4.0] and stock["rate"] == 4.0 and "deadline" in stock["stopped"]
    assert starts[0][1] <= 1.01  # the start waits no longer than leaves room for a probe

    fake = _FakeVLLMServer()
    fake.log_text = lambda: "line\nCUDA out of memory"
    _serve_fake(monkeypatch, fake, ready=False)
    stock = {}
    soak.measure_stock_rate(str(tmp_path), "m", [4.0], 1.0, mix, 5.0, _measure_args(tmp_path), stock,
                            str(tmp_path / "log"))
    assert stock["rate"] is None and stock["why"] == "exited" and stock["server_log_tail"][-1] == "CUDA out of memory"


def test_measure_only_without_a_rate_fails(tmp_path, monkeypatch):
    """soak-rate must not say "all checks passed" (exit 0) when it found no rate: the soak
    step would then stop at once on it."""
    def measure(work, model_dir, rates, probe_s, mix, slo_s, args, stock, log_path, deadline=None):
        stock.update(rate=None, probes=[], why="server exited")

    monkeypatch.setattr(soak.serve, "missing_modules", lambda names: [])
    monkeypatch.setattr(soak, "measure_stock_rate", measure)
    out = tmp_path / "rate.json"
    assert soak.main(["--measure-only", "--work-dir", str(tmp_path / "w"), "--out", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["failed_checks"][0].startswith("no sustained rate") and data["stock_rate"]["rate"] is None

    def found(work, model_dir, rates, probe_s, mix, slo_s, args, stock, log_path, deadline=None):
        stock.update(rate=8.0, probes=[])
        assert log_path == "/x/stock.log" and deadline is not None

    monkeypatch.setattr(soak, "measure_stock_rate", found)
    assert soak.main(["--measure-only", "--work-dir", str(tmp_path / "w"), "--out", str(out),
                      "--log", "/x/stock.log", "--deadline-s", "480"]) == 0
    data = json.loads(out.read_text())
    assert data["rate"] == 8.0 and data["failed_checks"] == []
    soak_args = ["--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "s.json"), "--rate-from", str(out)]
    monkeypatch.setattr(soak, "soak", lambda args, result: result.update(ran_at=args.rate))
    soak.main(soak_args)
    assert json.loads((tmp_path / "s.json").read_text())["ran_at"] == 8.0


def test_gpu_run_soak_steps_parse():
    """The arguments benchmarks/gpu_run.sh gives gpu_soak.py (shell variables as placeholders)."""
    import re
    import shlex

    text = open(os.path.join(REPO, "benchmarks", "gpu_run.sh")).read().replace("\\\n", " ")
    calls = re.findall(r'benchmarks/gpu_soak.py" (.*?) 2>&1', text)
    assert len(calls) == 2
    for call in calls:
        call = call.replace('"${rate_from[@]}"', "--rate-from R.json")
        args = soak.parse_args([a if not a.startswith("$") else "1" for a in shlex.split(call)])
        assert args.work_dir == "/dev/shm/slora-soak"
    rate_step = soak.parse_args([a if not a.startswith("$") else "1" for a in shlex.split(calls[0])])
    assert rate_step.measure_only and rate_step.deadline_s is not None and rate_step.log
    # the deadline leaves a probe's longest drain and the server's stop inside `timeout 540`
    limit = int(re.search(r"timeout -k 10 (\d+) \$PY \"\$REPO/benchmarks/gpu_soak.py\" --measure-only", text)[1])
    assert rate_step.deadline_s + 30 <= limit
