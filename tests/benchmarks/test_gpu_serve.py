"""The CPU half of benchmarks/gpu_serve.py (the `vllm serve` check run on the H100): its adapter
directory (each broken adapter refused by the plugin's own validation where the script expects,
with the adapter, file and reason its log check looks for), its command line (parsed by vLLM's
own `serve` parser into an engine config with the plugin on), its request body (vLLM's
CompletionRequest fields) and the logic that turns HTTP answers into checks."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from http import HTTPStatus

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_serve", os.path.join(REPO, "benchmarks", "gpu_serve.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_serve"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gs = _load_script()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model dir, adapter dir, dims) as the script writes them."""
    root = tmp_path_factory.mktemp("serve")
    dims = gs.model_dims()
    adapter_dir = str(root / "adapters")
    names = gs.write_adapters(adapter_dir, dims)
    assert sorted(names) == sorted(os.listdir(adapter_dir))
    return gs.write_model(str(root / "model")), adapter_dir, dims


@pytest.fixture
def store(served):
    from slora_plugin.adapters.store import AdapterStore
    from slora_plugin.model_config import ModelMemory, load_model_config

    _, adapter_dir, dims = served
    page_elems = ModelMemory.from_config(load_model_config(gs.MODEL_CONFIG_DIR)).page_elems()
    with AdapterStore(dims, page_elems, torch.float16, adapter_dir=adapter_dir, max_rank=gs.MAX_LORA_RANK,
                      host_cache_bytes=1 << 24, loader_threads=1) as s:
        yield s


def _error_of(fn):
    from slora_plugin.adapters.errors import AdapterError

    try:
        fn()
    except AdapterError as e:
        return e
    return None


def test_good_adapters_load(store):
    for name, (rank, targets) in gs.GOOD.items():
        with store.get(name) as lease:
            assert dict(lease.spec.ranks) == {m: rank for m in targets}


@pytest.mark.parametrize("name", list(gs.BROKEN))
def test_each_broken_adapter_is_refused_naming_adapter_file_and_reason(store, served, name):
    """The worker's add_lora is what vLLM's resolver calls: an adapter meant to be refused at
    resolution must be refused there; every broken adapter is refused at the latest when
    its weights are read, and the error text is what the script's log check looks for."""
    from vllm.lora.request import LoRARequest

    from slora_plugin.worker.worker import SLoRAWorker

    broken = gs.BROKEN[name]
    path = os.path.join(served[1], name)
    worker = object.__new__(SLoRAWorker)
    worker.adapter_store = store
    at_resolution = _error_of(lambda: worker.add_lora(LoRARequest(name, 1, path)))
    if broken.at_resolution:
        assert at_resolution is not None
    error = at_resolution or _error_of(lambda: store.get(name).release())
    assert error is not None and (error.adapter, error.file) == (name, broken.file)
    assert broken.reason in error.reason
    vllm_warning = (f"WARNING 11-23 00:00:00 [serving.py:320] Failed to load LoRA '{name}' resolved by "
                    f"SLoRAResolver: Call to add_lora method failed: {error}. Trying next resolver.")
    log = f"INFO other line naming '{name}'\n{vllm_warning}\n"
    assert gs.log_lines_naming(log, name, broken.file, broken.reason) == [vllm_warning]
    assert gs.logged(name, broken, lambda: log, wait_s=0).ok


def test_resolver_finds_every_adapter_but_the_unknown_one(served):
    from slora_plugin.adapters.resolver import SLoRAResolver
    from slora_plugin.adapters.sources import AdapterSources

    resolver = SLoRAResolver(AdapterSources(served[1]))
    for name in [*gs.GOOD, *gs.BROKEN]:
        assert resolver.resolve(name).lora_name == name
    assert resolver.resolve(gs.UNKNOWN) is None  # vLLM answers 404


def _parse_serve(argv):
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    cmd = ServeSubcommand()
    cmd.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)
    cmd.validate(args)
    return args


def test_serve_command_parses_into_an_engine_with_the_plugin_on(served, cpu_platform):
    """vLLM's own `serve` parser and engine-config path, as `vllm serve` runs them: a typo in
    a flag or in the plugin's JSON fails here instead of on the GPU."""
    import vllm.envs
    from vllm.engine.arg_utils import AsyncEngineArgs

    import slora_plugin
    from slora_plugin.patches.engine_args import WORKER_CLS

    model_dir, adapter_dir, _ = served
    cmd = gs.serve_command(model_dir, adapter_dir, 8123)
    assert cmd[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    assert importlib.util.find_spec(cmd[2]) is not None
    args = _parse_serve(cmd[3:])
    assert (args.model_tag, args.port, args.host) == (model_dir, 8123, "127.0.0.1")
    args.model = args.model_tag  # what ServeSubcommand.cmd does
    slora_plugin.register()
    vc = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert vc.lora_config is not None and vc.lora_config.max_lora_rank == gs.MAX_LORA_RANK
    assert vc.parallel_config.worker_cls == WORKER_CLS
    assert vc.additional_config["slora"]["adapter_dir"] == adapter_dir
    assert vc.load_config.load_format == "dummy" and vc.model_config.skip_tokenizer_init
    assert vc.model_config.served_model_name == gs.SERVED_NAME
    env = gs.serve_env({"VLLM_SLORA_ADAPTER_DIR": "/elsewhere", "PATH": "/bin"}, "/m")
    assert env == {"PATH": "/bin", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "PROMETHEUS_MULTIPROC_DIR": "/m"}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in vllm.envs.environment_variables


def test_request_body_is_a_vllm_completion_request():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    body = gs.completion_body("good-qkvo-r8", 1)
    assert set(body) <= set(CompletionRequest.model_fields)
    req = CompletionRequest(**body)
    params = req.to_sampling_params(max_tokens=gs.MAX_TOKENS, default_sampling_params={})
    assert params.ignore_eos and params.max_tokens == gs.MAX_TOKENS and params.temperature == 0.0
    assert req.return_token_ids and len(req.prompt) == gs.PROMPT_LEN


def test_serve_modules_are_real_module_names():
    assert gs.missing_modules() == []  # this venv has vLLM's full serving dependencies
    assert gs.missing_modules(("no_such_module_xyz",)) == ["no_such_module_xyz"]


def _vllm_error(message, err_type, status):
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    return json.loads(create_error_response(message, err_type, status).model_dump_json())


def _completion(finish_reason="length", n=gs.MAX_TOKENS, stop_reason=None):
    return {"choices": [{"index": 0, "text": "", "finish_reason": finish_reason,
                         "stop_reason": stop_reason, "token_ids": list(range(n))}]}


def test_answered_needs_all_tokens():
    assert gs.answered("a", 200, _completion()).ok
    assert not gs.answered("a", 200, _completion(n=gs.MAX_TOKENS - 1)).ok
    assert not gs.answered("a", 200, _completion("error")).ok
    bad = gs.answered("a", None, "URLError: [Errno 111] Connection refused")
    assert not bad.ok and bad.got == "no answer (URLError: [Errno 111] Connection refused)"


def test_not_found_is_vllms_unknown_model_answer():
    body = _vllm_error(f"The model `{gs.UNKNOWN}` does not exist.", "NotFoundError", HTTPStatus.NOT_FOUND)
    assert gs.not_found("u", gs.UNKNOWN, 404, body).ok
    assert not gs.not_found("u", gs.UNKNOWN, 400, _vllm_error("x", "BadRequestError", HTTPStatus.BAD_REQUEST)).ok


def test_broken_request_needs_a_400_naming_adapter_file_and_reason():
    """The answers of issue 17 (vLLM's sentence then the reason at resolution; the reason alone
    for weights found bad later) pass; vLLM 0.26's own answers, which drop the reason, fail."""
    from vllm.entrypoints.openai.engine.protocol import GenerationError
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    from slora_plugin.patches.openai_errors import AdapterRequestError

    config, weights = gs.BROKEN["bad-config"], gs.BROKEN["bad-truncated"]
    config_error = "adapter 'bad-config', file adapter_config.json: not valid JSON (line 1)"
    refused = _vllm_error(f"LoRA adapter 'bad-config' was found but could not be loaded: {config_error}",
                          "BadRequestError", HTTPStatus.BAD_REQUEST)
    weights_error = ("adapter 'bad-truncated', file adapter_model.safetensors: cannot be read: "
                     "tensor 'x' lies past the end of the file (truncated?)")
    failed = json.loads(create_error_response(AdapterRequestError(weights_error)).model_dump_json())
    assert gs.broken_request("bad-config", config, 400, refused).ok
    assert gs.broken_request("bad-truncated", weights, 400, failed).ok
    assert not gs.broken_request("bad-rank", gs.BROKEN["bad-rank"], 400, refused).ok  # names another
    assert not gs.broken_request("bad-truncated", weights, 400, refused).ok  # another file, reason
    unexplained = _vllm_error("LoRA adapter 'bad-config' was found but could not be loaded.",
                              "BadRequestError", HTTPStatus.BAD_REQUEST)
    internal = json.loads(create_error_response(GenerationError("Internal server error")).model_dump_json())
    assert not gs.broken_request("bad-config", config, 400, unexplained).ok
    assert not gs.broken_request("bad-truncated", weights, 500, internal).ok
    assert not gs.broken_request("bad-truncated", weights, 200, _completion("error", 0, weights_error)).ok
    dead = _vllm_error("EngineCore encountered an issue.", "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)
    assert not gs.broken_request("bad-truncated", weights, 500, dead).ok


def test_metrics_checks_on_real_prometheus_text():
    from prometheus_client import REGISTRY, generate_latest

    from slora_plugin.pool.metrics import COUNTERS, GAUGES, PoolMetrics

    stats = {key: 0 for key in GAUGES} | {key: 0 for key in COUNTERS} | {"adapter_loads": 3}
    PoolMetrics("serve-test", 0).update(stats)
    ours = [line for line in generate_latest(REGISTRY).decode().splitlines()  # not other tests' series
            if not line.startswith("slora:") or 'model_name="serve-test"' in line]
    text = "\n".join(ours) + '\nvllm:num_requests_running{model_name="x"} 0.0\n'
    assert [c.ok for c in gs.metrics_checks(200, text, min_loads=3)] == [True, True]
    assert [c.ok for c in gs.metrics_checks(200, text, min_loads=4)] == [True, False]
    without = "\n".join(line for line in text.splitlines() if "slora:pages_free" not in line)
    first = gs.metrics_checks(200, without, min_loads=3)[0]
    assert not first.ok and "slora:pages_free" in first.got


def test_result_file_and_table(tmp_path):
    checks = [gs.Check("a", "200", "200", True), gs.Check("longer name", "404", "500 x", False)]
    path = tmp_path / "r" / "serve.json"
    gs.write_result(str(path), "cpu", checks, {"command": ["vllm"]})
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["command"] == ["vllm"]
    assert data["checks"][1] == {"check": "longer name", "expected": "404", "got": "500 x", "ok": False}
    assert gs.table(checks).splitlines() == ["ok    a            200", "FAIL  longer name  500 x",
                                             "1/2 checks passed"]


def test_importing_the_script_starts_nothing():
    """vLLM's spawned processes may import the parent's main script as __mp_main__."""
    import runpy

    before = list(sys.path)
    ns = runpy.run_path(os.path.join(REPO, "benchmarks", "gpu_serve.py"), run_name="__mp_main__")
    assert sys.path == before and ns["RESULTS"] == os.path.join(REPO, "benchmarks", "results")


class _FakeVLLM:
    """An HTTP server answering like `vllm serve` with the plugin does (per the vLLM 0.26
    sources and patches/openai_errors.py): completions for adapters and the base model, 404 for
    unknown names, 400 naming the adapter, file and reason for broken ones; `dead_after` makes every
    later request fail the way a dead engine does."""

    def __init__(self, dead_after: str | None = None):
        import http.server
        import threading

        from prometheus_client import REGISTRY, generate_latest

        from slora_plugin.pool.metrics import COUNTERS, GAUGES, PoolMetrics

        stats = {key: 1 for key in GAUGES} | {key: 0 for key in COUNTERS} | {"adapter_loads": 3}
        PoolMetrics("fake-serve", 0).update(stats)
        metrics = generate_latest(REGISTRY).decode() + "vllm:num_requests_running 0.0\n"
        self.log: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                raw = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, metrics if self.path == "/metrics" else "")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body["model"]
                if fake.dead:
                    return self._send(500, _vllm_error("EngineCore encountered an issue.", "InternalServerError",
                                                       HTTPStatus.INTERNAL_SERVER_ERROR))
                if model in gs.GOOD or model == gs.SERVED_NAME:
                    return self._send(200, _completion(n=body["max_tokens"]))
                if model in gs.BROKEN:
                    b = gs.BROKEN[model]
                    fake.log.append(f"ERROR adapter '{model}', file {b.file}: {b.reason}")
                    fake.dead = model == dead_after
                    reason = f"adapter '{model}', file {b.file}: {b.reason}"
                    if b.at_resolution:
                        reason = f"LoRA adapter '{model}' was found but could not be loaded: {reason}"
                    return self._send(400, _vllm_error(reason, "BadRequestError", HTTPStatus.BAD_REQUEST))
                return self._send(404, _vllm_error(f"The model `{model}` does not exist.", "NotFoundError",
                                                   HTTPStatus.NOT_FOUND))

        self.dead = False
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("dead_after", [None, "bad-truncated"])
def test_run_checks_against_a_fake_server(dead_after):
    fake = _FakeVLLM(dead_after)
    try:
        checks = gs.run_checks(fake.url, lambda: "\n".join(fake.log), gs.Deadline(30))
    finally:
        fake.close()
    failed = [c.check for c in checks if not c.ok]
    if dead_after is None:
        assert failed == []
        assert len(checks) == 3 + 1 + 3 * len(gs.BROKEN) + 3 + 2
    else:  # the good request beside it fails too if it reaches the dead engine after it
        after = ["after: adapter good-all-r16", "after: base model tiny-llama"]
        assert failed in (after, ["broken bad-truncated: good-qkvo-r8 beside it", *after])


def test_wait_ready_reports_a_server_that_exits(tmp_path):
    server = gs.Server([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], dict(os.environ),
                       str(tmp_path / "log"), str(tmp_path))
    try:
        check = gs.wait_ready(server, f"http://127.0.0.1:{gs.free_port()}", timeout_s=30)
    finally:
        server.stop()
    assert not check.ok and check.got == "server exited with status 3"
    assert server.log_text().strip() == "boom"


def test_stop_kills_the_whole_process_group(tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            "print(p.pid, flush=True); time.sleep(60)")
    server = gs.Server([sys.executable, "-c", code], dict(os.environ), str(tmp_path / "log"), str(tmp_path))
    import time

    for _ in range(100):
        if server.log_text().strip():
            break
        time.sleep(0.1)
    child = int(server.log_text().split()[0])
    server.stop()
    assert server.proc.poll() is not None and gs.Server.running == []
    for _ in range(50):  # killed: gone, or a zombie until whoever adopted it reaps it
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived stop()")


def test_main_writes_the_result_when_it_cannot_serve_or_is_terminated(tmp_path, monkeypatch):
    out = tmp_path / "serve.json"
    monkeypatch.setattr(gs.signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    monkeypatch.setattr(gs, "missing_modules", lambda: ["uvicorn"])
    assert gs.main(["--out", str(out), "--work-dir", str(tmp_path / "w")]) == 1
    assert json.loads(out.read_text())["checks"][0]["got"] == "missing ['uvicorn']"
    assert not (tmp_path / "w").exists()  # nothing written, nothing started

    def terminated(work, fresh, log, start_timeout, checks, extra):
        checks.append(gs.Check("server ready (/health)", "200", "200 after 1 s", True))
        raise SystemExit(143)  # what the SIGTERM handler raises

    monkeypatch.setattr(gs, "missing_modules", lambda: [])
    monkeypatch.setattr(gs, "serve_and_check", terminated)
    assert gs.main(["--out", str(out)]) == 1
    got = [(c["check"], c["ok"]) for c in json.loads(out.read_text())["checks"]]
    assert got == [("serve dependencies importable", True), ("server ready (/health)", True),
                   ("not interrupted", False)]
