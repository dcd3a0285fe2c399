"""End-to-end check of `vllm serve` with the plugin on, over HTTP (run on the GPU machine).

What a user of the README does: `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve MODEL
--additional-config '{"slora": {"adapter_dir": ...}}'`, then asks /v1/completions for adapters by
name. The model is the correctness fixture's tiny GQA Llama config (head 64, the shape that ran on
the H100) with dummy weights and no tokenizer, so prompts are token ids. The adapter directory
holds a few valid adapters and three broken ones, each of whose requests must answer 400 with
the adapter, the file and the reason in the body:

- `bad-config`: adapter_config.json is not valid JSON;
- `bad-rank`: rank 32 above the server's `max_lora_rank` 16;
- `bad-truncated`: the safetensors file cut in half (its config is fine, so it passes the
  config check at resolution and fails when its weights are read).

Checks (each one a row {check, expected, got, ok} in benchmarks/results/serve-DATE.json):
good adapters answer (one alone, two at once), an unknown name gets vLLM's 404, each broken
adapter fails only its own request (400 naming it, its file and why) and the server log names
the adapter, the file and why,
then a good adapter, the base model and /health still answer, and /metrics carries `slora:*`
(PROMETHEUS_MULTIPROC_DIR is exported to a fresh directory, as the README says). Exit 1 if any
check fails. The server runs in its own process group, killed on exit whatever happens.

    cd /tmp && python3 /path/to/benchmarks/gpu_serve.py --log /tmp/out/serve-server.log
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
#: The model config that ran end to end on the H100 (benchmarks/gpu_correctness.py).
MODEL_CONFIG_DIR = os.path.join(HERE, "fixtures", "correctness", "model")
SERVED_NAME = "tiny-llama"
MAX_LORA_RANK = 16
MAX_TOKENS = 8
PROMPT_LEN = 12
START_TIMEOUT_S = 240.0
#: Every HTTP check together (a request takes well under a second on the tiny model; a hung
#: server must not keep the GPU for minutes): past it, each request gets 1 s.
CHECKS_BUDGET_S = 90.0
REQUEST_TIMEOUT_S = 30.0
LOG_WAIT_S = 10.0
UNKNOWN = "no-such-adapter"
#: Modules `vllm serve` imports that offline `LLM(...)` does not (vLLM 0.26.0: uvicorn and its
#: click/h11, watchfiles for the SSL refresher, the SageMaker router and its jmespath, the
#: /metrics instrumentator). The GPU machine's staged vLLM may lack them; checked first.
SERVE_MODULES = ("uvicorn", "click", "h11", "watchfiles", "model_hosting_container_standards",
                 "jmespath", "prometheus_fastapi_instrumentator")

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
#: name -> (rank, PEFT target modules): valid adapters.
GOOD: dict[str, tuple[int, tuple[str, ...]]] = {
    "good-qkvo-r8": (8, QKVO),
    "good-all-r16": (16, QKVO + MLP),
    "good-mlp-r4": (4, MLP),
}


@dataclass(frozen=True)
class Broken:
    """A broken adapter, the file its error must name, and a phrase of the reason. Its request
    must answer 400 BadRequestError whose message names the adapter, the file and the reason
    (issue 17; `patches/openai_errors.py`). `at_resolution`: refused when vLLM resolves the
    name (the worker's add_lora checks the config), else when its weights are read."""

    file: str
    reason: str
    at_resolution: bool


BROKEN: dict[str, Broken] = {
    "bad-config": Broken("adapter_config.json", "not valid JSON", True),
    "bad-rank": Broken("adapter_config.json", "above the configured maximum", True),
    # Its config is valid, so resolution accepts it: its request fails when the weights are read.
    "bad-truncated": Broken("adapter_model.safetensors", "lies past the end of the file", False),
}


class Deadline:
    """The time left for the HTTP checks; `timeout()` is one request's share."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def timeout(self) -> float:
        return max(1.0, min(REQUEST_TIMEOUT_S, self.left()))


@dataclass
class Check:
    """One row of the result: what was checked, what should come back, what did."""

    check: str
    expected: str
    got: str
    ok: bool


# --------------------------------------------------------------------------- files
def model_dims():
    """The served model's dimensions (what the adapters are written for)."""
    from slora_plugin.model_config import load_model_dims

    return load_model_dims(MODEL_CONFIG_DIR)


def write_model(directory: str) -> str:
    """A config-only model directory (vLLM runs it with --load-format dummy)."""
    from slora_plugin.model_config import load_model_config, write_model_config

    return write_model_config(directory, load_model_config(MODEL_CONFIG_DIR))


def write_adapters(directory: str, dims) -> list[str]:
    """The good adapters of GOOD and the broken ones of BROKEN; returns every name."""
    from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_random_adapter

    def adapter(name: str, rank: int, targets: tuple[str, ...], seed: int) -> str:
        return write_random_adapter(os.path.join(directory, name), dims, rank, targets, seed=seed)

    for i, (name, (rank, targets)) in enumerate(GOOD.items()):
        adapter(name, rank, targets, i)
    with open(os.path.join(adapter("bad-config", 8, QKVO, 10), CONFIG_NAME), "w") as f:
        f.write('{"peft_type": "LORA", "r": ')
    adapter("bad-rank", 2 * MAX_LORA_RANK, QKVO, 11)
    weights = os.path.join(adapter("bad-truncated", 8, QKVO, 12), WEIGHTS_NAME)
    os.truncate(weights, os.path.getsize(weights) // 2)  # the header survives, the tensors do not
    return [*GOOD, *BROKEN]


# --------------------------------------------------------------------------- the server
def serve_command(model_dir: str, adapter_dir: str, port: int) -> list[str]:
    """`vllm serve` as the README enables the plugin (through vLLM's CLI module: the GPU
    machine may have no `vllm` script on PATH)."""
    slora = {"adapter_dir": adapter_dir, "max_lora_rank": MAX_LORA_RANK}
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
            "--served-model-name", SERVED_NAME, "--load-format", "dummy", "--dtype", "float16",
            "--skip-tokenizer-init", "--max-model-len", "256", "--gpu-memory-utilization", "0.3",
            "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
            "--additional-config", json.dumps({"slora": slora})]


def serve_env(base: dict[str, str], metrics_dir: str) -> dict[str, str]:
    """Runtime LoRA resolution on (vLLM consults resolvers only then) and a fresh
    multiprocess-metrics directory (the engine core's slora:* metrics reach /metrics)."""
    env = {k: v for k, v in base.items() if k not in ("VLLM_SLORA_CONFIG", "VLLM_SLORA_ADAPTER_DIR")}
    env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The `vllm serve` child in its own process group (vLLM's API server, engine core and
    worker); `stop()` ends the whole group, and so does SIGTERM to this script."""

    running: list["Server"] = []

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str, cwd: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        Server.running.append(self)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.kill()  # processes left behind by a server that exited on its own
        self._log.close()
        if self in Server.running:
            Server.running.remove(self)

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


# --------------------------------------------------------------------------- HTTP
def http(method: str, url: str, body: dict | None = None,
         timeout: float = REQUEST_TIMEOUT_S) -> tuple[int | None, Any]:
    """(status, parsed JSON or text); status None when no HTTP answer came (text says why)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return None, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def completion_body(model: str, seed: int) -> dict:
    rng = random.Random(seed)
    return {"model": model, "prompt": [rng.randrange(3, 1000) for _ in range(PROMPT_LEN)],
            "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}


def _error(body: Any) -> tuple[str, str]:
    """(type, message) of vLLM's ErrorResponse, else ("", the body as text)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("type", "")), str(body["error"].get("message", ""))
    return "", str(body)[:300]


def _choice(body: Any) -> dict:
    try:
        return body["choices"][0]
    except (TypeError, KeyError, IndexError):
        return {}


def describe(status: int | None, body: Any) -> str:
    """What came back, in one line."""
    if status is None:
        return f"no answer ({body})"
    if status == 200:
        c = _choice(body)
        return (f"200 finish_reason={c.get('finish_reason')!r} stop_reason={c.get('stop_reason')!r} "
                f"tokens={len(c.get('token_ids') or [])}")
    kind, message = _error(body)
    return f"{status} {kind} {message!r}"


def answered(check: str, status: int | None, body: Any) -> Check:
    """A completion that must succeed with MAX_TOKENS tokens."""
    c = _choice(body) if status == 200 else {}
    ok = status == 200 and c.get("finish_reason") == "length" and len(c.get("token_ids") or []) == MAX_TOKENS
    return Check(check, f"200, finish_reason 'length', {MAX_TOKENS} token ids", describe(status, body), ok)


def not_found(check: str, name: str, status: int | None, body: Any) -> Check:
    kind, message = _error(body)
    ok = status == 404 and kind == "NotFoundError" and name in message
    return Check(check, f"404 NotFoundError naming {name!r} (vLLM's unknown-model answer)",
                 describe(status, body), ok)


def broken_request(name: str, broken: Broken, status: int | None, body: Any) -> Check:
    kind, message = _error(body)
    ok = (status == 400 and kind == "BadRequestError" and f"'{name}'" in message
          and broken.file in message and broken.reason in message)
    return Check(f"broken {name}: its request fails", f"400 BadRequestError naming {name!r}, "
                 f"{broken.file} and {broken.reason!r}", describe(status, body), ok)


def log_lines_naming(log: str, name: str, file: str, reason: str) -> list[str]:
    """Lines of the server log that name the adapter, the file and the reason."""
    return [line.strip() for line in log.splitlines()
            if f"'{name}'" in line and file in line and reason in line]


def logged(name: str, broken: Broken, read_log: Callable[[], str], wait_s: float = LOG_WAIT_S) -> Check:
    """The server log names the adapter, its file and the reason (waits up to `wait_s` for it)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = log_lines_naming(read_log(), name, broken.file, broken.reason)
        if lines or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return Check(f"broken {name}: server log names it",
                 f"a line with '{name}', {broken.file} and {broken.reason!r}",
                 lines[0][-400:] if lines else "no such line", bool(lines))


def metric_sum(text: str, name: str) -> float | None:
    """Sum of the samples of metric `name` in Prometheus text format (None: absent)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                continue
    return total if seen else None


def metrics_checks(status: int | None, text: Any, min_loads: int) -> list[Check]:
    from slora_plugin.pool.metrics import COUNTERS, GAUGES

    names = [n for n, _ in GAUGES.values()] + [n + "_total" for n, _ in COUNTERS.values()]
    body = text if isinstance(text, str) else ""
    missing = [n for n in names if metric_sum(body, n) is None]
    loads = metric_sum(body, "slora:adapter_loads_total")
    return [
        Check("/metrics: slora:* metrics", f"200 with all of {len(names)} slora:* metrics",
              f"{status}, missing {missing}" if missing else f"{status}, all present",
              status == 200 and not missing and metric_sum(body, "vllm:num_requests_running") is not None),
        Check("/metrics: adapter loads", f"slora:adapter_loads_total >= {min_loads}", f"{loads}",
              loads is not None and loads >= min_loads),
    ]


# --------------------------------------------------------------------------- run
def run_checks(base_url: str, read_log: Callable[[], str], deadline: Deadline,
               checks: list[Check] | None = None) -> list[Check]:
    """Every HTTP check, in order, appended to `checks` as it is made (kept if interrupted);
    the server is up."""
    checks = [] if checks is None else checks
    url = base_url + "/v1/completions"

    def post(model: str, seed: int) -> tuple[int | None, Any]:
        return http("POST", url, completion_body(model, seed), deadline.timeout())

    checks.append(answered("adapter good-qkvo-r8", *post("good-qkvo-r8", 1)))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        two = {n: pool.submit(post, n, 2) for n in ("good-all-r16", "good-mlp-r4")}
        checks += [answered(f"concurrent: adapter {n}", *f.result()) for n, f in two.items()]
        checks.append(not_found(f"unknown adapter {UNKNOWN}", UNKNOWN, *post(UNKNOWN, 3)))
        for name, broken in BROKEN.items():
            beside = pool.submit(post, "good-qkvo-r8", 4)  # a good request in flight beside it
            checks.append(broken_request(name, broken, *post(name, 5)))
            checks.append(answered(f"broken {name}: good-qkvo-r8 beside it", *beside.result()))
            checks.append(logged(name, broken, read_log, min(LOG_WAIT_S, deadline.left())))
    checks.append(answered("after: adapter good-all-r16", *post("good-all-r16", 6)))
    checks.append(answered(f"after: base model {SERVED_NAME}", *post(SERVED_NAME, 7)))
    status, body = http("GET", base_url + "/health", timeout=deadline.timeout())
    checks.append(Check("after: /health", "200", describe(status, body) if status != 200 else "200",
                        status == 200))
    checks += metrics_checks(*http("GET", base_url + "/metrics", timeout=deadline.timeout()),
                             min_loads=len(GOOD))
    return checks


def wait_ready(server: Server, base_url: str, timeout_s: float) -> Check:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if server.proc.poll() is not None:
            return Check("server ready (/health)", f"200 within {timeout_s:.0f} s",
                         f"server exited with status {server.proc.returncode}", False)
        status, _ = http("GET", base_url + "/health", timeout=5)
        if status == 200:
            return Check("server ready (/health)", f"200 within {timeout_s:.0f} s",
                         f"200 after {time.monotonic() - t0:.0f} s", True)
        time.sleep(1.0)
    return Check("server ready (/health)", f"200 within {timeout_s:.0f} s", "timed out", False)


def missing_modules(names: tuple[str, ...] = SERVE_MODULES) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def table(checks: list[Check]) -> str:
    w = max(len(c.check) for c in checks)
    rows = [f"{'ok' if c.ok else 'FAIL':4}  {c.check:<{w}}  {c.got}" for c in checks]
    return "\n".join(rows + [f"{sum(c.ok for c in checks)}/{len(checks)} checks passed"])


def write_result(path: str, device: str, checks: list[Check], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = {"date": _dt.date.today().isoformat(), "device": device,
              "checks": [asdict(c) for c in checks], **(extra or {})}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def serve_and_check(work: str, fresh: bool, log: str | None, start_timeout: float,
                    checks: list[Check], extra: dict[str, Any]) -> None:
    """Write the model and adapters, start the server, run the checks (appended to `checks`),
    stop the server whatever happens."""
    if fresh:  # a reused directory starts empty: stale metric files would add up
        shutil.rmtree(work, ignore_errors=True)
    model_dir = write_model(os.path.join(work, "model"))
    adapter_dir = os.path.join(work, "adapters")
    write_adapters(adapter_dir, model_dims())
    metrics_dir = os.path.join(work, "prometheus")
    cwd = os.path.join(work, "cwd")  # empty: `-m` puts the working directory on sys.path
    os.makedirs(metrics_dir)
    os.makedirs(cwd)
    port = free_port()
    cmd = serve_command(model_dir, adapter_dir, port)
    extra["command"] = cmd
    print("$", shlex.join(cmd), flush=True)
    server = Server(cmd, serve_env(dict(os.environ), metrics_dir), log or os.path.join(work, "server.log"), cwd)
    try:
        base_url = f"http://127.0.0.1:{port}"
        ready = wait_ready(server, base_url, start_timeout)
        checks.append(ready)
        if ready.ok:
            run_checks(base_url, server.log_text, Deadline(CHECKS_BUDGET_S), checks)
        extra["server_alive_at_end"] = server.proc.poll() is None
    finally:
        server.stop()
        extra["server_log_tail"] = server.log_text().splitlines()[-40:]


def _terminate(signum, frame):
    """SIGTERM (`timeout`): kill the server at once (unwinding may wait on a request first)."""
    for server in list(Server.running):
        server.kill()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", help="where the model config and adapters are written (default: a temp dir)")
    ap.add_argument("--log", help="server log file (default: WORK_DIR/server.log)")
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/serve-DATE.json)")
    ap.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    work = a.work_dir or tempfile.mkdtemp(prefix="slora-serve-")
    out = a.out or os.path.join(RESULTS, f"serve-{_dt.date.today().isoformat()}.json")
    device = device_name()
    missing = missing_modules()
    checks = [Check("serve dependencies importable", ", ".join(SERVE_MODULES),
                    f"missing {missing}" if missing else "all found", not missing)]
    extra: dict[str, Any] = {}
    if not missing:
        try:
            serve_and_check(work, bool(a.work_dir), a.log, a.start_timeout, checks, extra)
        except SystemExit as e:  # SIGTERM (the server is stopped by then): still write what we have
            checks.append(Check("not interrupted", "the checks run to the end", f"terminated ({e.code})", False))
    write_result(out, device, checks, extra)
    print(table(checks))
    print(f"wrote {out}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
