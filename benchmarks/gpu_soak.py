"""Serving soak (issue 17): `vllm serve` with the plugin over 2,000 adapters under load for
10 minutes while adapter directories are deleted, truncated, replaced and added (run on the GPU).

- Model: Llama-2-7B's config with dummy weights, prompts as token ids (no tokenizer), so only
  /v1/completions is exercised here (the chat answers are CPU-tested:
  tests/patches/test_openai_errors.py).
- Adapters: `slora-plugin adapters synth DIR --count 2000 --distinct 4` (ranks 8..64; hard links
  share weight files, so the chaos thread copies a file before it truncates it).
- Load: Poisson arrivals at `--rate` requests/s (`auto`: first measure the highest rate stock
  vLLM sustains on the same model, base model, no LoRA, with the same lengths; `--rate-from`
  reads a previous measurement), adapters by power-law popularity (rank k drawn with weight
  1/k^alpha; adapters added by the chaos thread join at the tail), a few base-model requests,
  half of them streamed, some streamed clients disconnecting after a few chunks.
- Chaos (a thread, every `--chaos-every-s`): delete an adapter directory, truncate its weights,
  replace it with another rank's weights, or add a new one; every touched name is remembered.
- Checks, written to benchmarks/results/soak-DATE.json: the server never dies; every request
  completes or fails with an answer naming its adapter (`failed_without_reason` must be 0;
  requests of adapters never touched must complete: `failed_untouched`); a sample of completed
  requests of untouched adapters is sent again alone after the load and must give the same
  tokens (greedy; a divergence at a near-tie of the solo run's top-2 log-probabilities is
  counted apart, as dummy weights give flat logits); after the load drains no KV page is held
  (`leaked_pages` = slora:pages_kv with nothing running) and free + KV + adapter pages = total;
  the server's resident memory stays within `--rss-budget-gib` and does not grow after the
  warm-up by more than the host adapter cache; latency percentiles per window (and a plot).

The server helpers (process group, HTTP, readiness, device name) are benchmarks/gpu_serve.py's.

    cd /tmp && python3 /path/to/benchmarks/gpu_soak.py --work-dir /dev/shm/slora-soak --rate auto
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as _dt
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LLAMA2_CONFIG_DIR = os.path.join(HERE, "configs", "llama-2-7b")
SERVED_NAME = "base"
MAX_LORA_RANK = 64
#: Host adapter cache of the soak server (the pinned-memory budget it must stay within).
HOST_CACHE_BYTES = 4 * 2**30
DURATION_S = 600.0
NUM_ADAPTERS = 2000
PROMPT_LEN = (32, 512)
OUTPUT_LEN = (16, 128)
#: A request not answered within this is counted as `no_answer` (the server must keep up).
REQUEST_TIMEOUT_S = 300.0


def _load_gpu_serve():
    """benchmarks/gpu_serve.py, for its server and HTTP helpers (one module per process)."""
    if "gpu_serve" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_serve", os.path.join(HERE, "gpu_serve.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_serve"] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["gpu_serve"]


serve = _load_gpu_serve()


# --------------------------------------------------------------------------- the workload
def poisson_arrivals(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


class Popularity:
    """Names drawn by power law: the k-th name (1-based) with weight 1/k^alpha. Names can be
    added while drawing (the chaos thread's new adapters join at the tail); thread-safe."""

    def __init__(self, names: Iterable[str], alpha: float) -> None:
        self.alpha = alpha
        self.names: list[str] = []
        self._cum: list[float] = []
        self._lock = threading.Lock()
        for n in names:
            self.add(n)

    def add(self, name: str) -> None:
        with self._lock:
            weight = 1.0 / (len(self.names) + 1) ** self.alpha
            self.names.append(name)
            self._cum.append((self._cum[-1] if self._cum else 0.0) + weight)

    def draw(self, rng: random.Random) -> str:
        with self._lock:
            x = rng.random() * self._cum[-1]
            return self.names[min(bisect.bisect_right(self._cum, x), len(self.names) - 1)]


@dataclass(frozen=True)
class Planned:
    """One request of the load: when, for which model (an adapter or the base model), its
    prompt and length, streamed or not, and after how many chunks a streamed client hangs up
    (None: it reads to the end)."""

    t: float
    model: str
    prompt: tuple[int, ...]
    max_tokens: int
    stream: bool
    disconnect_after: int | None


@dataclass(frozen=True)
class Mix:
    """The shape of the load besides the arrival rate."""

    alpha: float = 1.0
    base_fraction: float = 0.05
    stream_fraction: float = 0.5
    disconnect_fraction: float = 0.1  # of streamed requests
    prompt_len: tuple[int, int] = PROMPT_LEN
    output_len: tuple[int, int] = OUTPUT_LEN
    vocab_size: int = 32000  # prompt token ids are drawn from [3, vocab_size)


def plan_request(t: float, popularity: Popularity | None, mix: Mix, rng: random.Random) -> Planned:
    """The request arriving at `t` (base model only when `popularity` is None)."""
    base = popularity is None or rng.random() < mix.base_fraction
    model = SERVED_NAME if base else popularity.draw(rng)  # type: ignore[union-attr]
    prompt = tuple(rng.randrange(3, mix.vocab_size) for _ in range(rng.randint(*mix.prompt_len)))
    max_tokens = rng.randint(*mix.output_len)
    stream = rng.random() < mix.stream_fraction
    hang_up = stream and rng.random() < mix.disconnect_fraction
    return Planned(t, model, prompt, max_tokens, stream,
                   rng.randint(1, max(1, max_tokens // 2)) if hang_up else None)


def request_body(p: Planned, *, logprobs: int | None = None) -> dict:
    body = {"model": p.model, "prompt": list(p.prompt), "max_tokens": p.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, "stream": p.stream}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


# --------------------------------------------------------------------------- outcomes
COMPLETED, FAILED_WITH_REASON, FAILED_WITHOUT_REASON = "completed", "failed_with_reason", "failed_without_reason"
DISCONNECTED, NO_ANSWER = "disconnected", "no_answer"
OUTCOMES = (COMPLETED, FAILED_WITH_REASON, FAILED_WITHOUT_REASON, DISCONNECTED, NO_ANSWER)


def names_adapter(message: str, model: str) -> bool:
    """Whether an error message names the request's adapter (quoted as the plugin and vLLM
    quote names: 'x' or `x`)."""
    return any(f"{q}{model}{q}" in message for q in ("'", "`"))


def classify(model: str, status: int | None, error_message: str | None, finish_reason: str | None,
             tokens: int, max_tokens: int) -> str:
    """One request's outcome. `status` None: no HTTP answer; `error_message`: the ErrorResponse's
    message (the body's, or a stream's error event's)."""
    if status is None:
        return NO_ANSWER
    if error_message is not None or status != 200:
        ok = model != SERVED_NAME and status in (400, 404) and names_adapter(error_message or "", model)
        return FAILED_WITH_REASON if ok else FAILED_WITHOUT_REASON
    if finish_reason == "length" and tokens == max_tokens:
        return COMPLETED
    return FAILED_WITHOUT_REASON  # a 200 that did not produce what was asked (e.g. "error")


@dataclass
class Record:
    """What happened to one request (times in seconds from the start of the load)."""

    t: float
    model: str
    stream: bool
    outcome: str
    status: int | None
    latency_s: float | None = None
    ttft_s: float | None = None
    message: str | None = None
    token_ids: list[int] | None = None
    touched: bool = False  # its adapter was touched by the chaos thread before it was answered


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank), None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def tally(records: list[Record]) -> dict[str, Any]:
    """The result's counts and latency percentiles (latencies of completed requests)."""
    counts = {o: sum(1 for r in records if r.outcome == o) for o in OUTCOMES}
    done = [r for r in records if r.outcome == COMPLETED]
    lat = [r.latency_s for r in done if r.latency_s is not None]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    return {"requests": len(records), **counts,
            "failed_untouched": sum(1 for r in records if r.outcome != COMPLETED and r.outcome != DISCONNECTED
                                    and not r.touched and r.model != SERVED_NAME),
            "failed_base_model": sum(1 for r in records if r.model == SERVED_NAME
                                     and r.outcome not in (COMPLETED, DISCONNECTED)),
            "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
            "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99)}


def latency_windows(records: list[Record], window_s: float) -> list[dict[str, Any]]:
    """Per window of arrival time: requests, completed, p50/p99 latency and TTFT."""
    if not records:
        return []
    last = max(r.t for r in records)
    rows = []
    for i in range(int(last // window_s) + 1):
        rs = [r for r in records if i * window_s <= r.t < (i + 1) * window_s]
        done = [r for r in rs if r.outcome == COMPLETED]
        lat = [r.latency_s for r in done if r.latency_s is not None]
        ttft = [r.ttft_s for r in done if r.ttft_s is not None]
        rows.append({"t0_s": i * window_s, "requests": len(rs), "completed": len(done),
                     "p50_latency_s": percentile(lat, 50), "p99_latency_s": percentile(lat, 99),
                     "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99)})
    return rows


def sustained(records: list[Record], slo_s: float) -> bool:
    """Whether a server kept up with the load of `records`: (almost) every request completed and
    p99 latency stays under `slo_s`. Judged against the requests that arrived, not the nominal
    rate: a Poisson count falls short of rate x window by chance (at 4/s for 30 s, below 0.9 of
    it one time in eight), which is no sign of the server. Requests whose client hung up on
    purpose (the mix's 5 %) are not the server's to complete."""
    asked = [r for r in records if r.outcome != DISCONNECTED]
    done = [r for r in asked if r.outcome == COMPLETED]
    lat = [r.latency_s for r in done if r.latency_s is not None]
    p99 = percentile(lat, 99)
    return len(asked) > 0 and len(done) >= 0.98 * len(asked) and p99 is not None and p99 <= slo_s


# --------------------------------------------------------------------------- chaos
class Chaos:
    """Operations on adapter directories of `root`, as an operator would do them to a live
    server: each is atomic for a reader (a new directory is renamed into place; a truncated
    file is a copy renamed over the old one, so hard-linked twins keep their weights)."""

    OPS = ("delete", "truncate", "replace", "add")

    def __init__(self, root: str, dims: Any, rng: random.Random, popularity: Popularity) -> None:
        self.root, self.dims, self.rng, self.popularity = root, dims, rng, popularity
        self.touched: dict[str, float] = {}  # name -> first time touched (monotonic)
        self.log: list[dict[str, Any]] = []
        self._added = 0
        self._lock = threading.Lock()

    def was_touched(self, name: str, before: float) -> bool:
        with self._lock:
            t = self.touched.get(name)
        return t is not None and t <= before

    def _touch(self, op: str, name: str, t0: float, detail: str = "") -> None:
        with self._lock:
            self.touched.setdefault(name, time.monotonic())
            self.log.append({"t_s": round(time.monotonic() - t0, 3), "op": op, "adapter": name,
                             "detail": detail})

    def _victim(self) -> str | None:
        names = [n for n in self.popularity.names if os.path.isdir(os.path.join(self.root, n))]
        return self.rng.choice(names) if names else None

    def delete(self, name: str, t0: float) -> None:
        shutil.rmtree(os.path.join(self.root, name))
        self._touch("delete", name, t0)

    def truncate(self, name: str, t0: float) -> None:
        from slora_plugin.adapters.peft_format import WEIGHTS_NAME

        path = os.path.join(self.root, name, WEIGHTS_NAME)
        tmp = path + ".chaos"
        shutil.copyfile(path, tmp)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.replace(tmp, path)
        self._touch("truncate", name, t0)

    def _write(self, rank: int) -> str:
        from slora_plugin.adapters.peft_format import write_random_adapter

        staging = tempfile.mkdtemp(prefix=".chaos-", dir=self.root)  # hidden: never indexed
        write_random_adapter(os.path.join(staging, "a"), self.dims, rank,
                             ("q_proj", "k_proj", "v_proj", "o_proj"), seed=self.rng.randrange(1 << 30))
        return os.path.join(staging, "a")

    def replace(self, name: str, t0: float) -> None:
        rank = self.rng.choice((8, 16, 32, 64))
        new = self._write(rank)
        target = os.path.join(self.root, name)
        old = new + ".old"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(os.path.dirname(new))
        self._touch("replace", name, t0, f"rank {rank}")

    def add(self, t0: float) -> str:
        self._added += 1
        name = f"chaos-added-{self._added:04d}"
        rank = self.rng.choice((8, 16, 32, 64))
        new = self._write(rank)
        os.rename(new, os.path.join(self.root, name))
        shutil.rmtree(os.path.dirname(new))
        self.popularity.add(name)
        self._touch("add", name, t0, f"rank {rank}")
        return name

    def step(self, t0: float) -> str | None:
        """One random operation; the name it touched (None if nothing was left to touch)."""
        op = self.rng.choice(self.OPS)
        if op == "add":
            return self.add(t0)
        victim = self._victim()
        if victim is None:
            return None
        getattr(self, op)(victim, t0)
        return victim

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {op: sum(1 for e in self.log if e["op"] == op) for op in self.OPS}


def run_chaos(chaos: Chaos, every_s: float, stop: threading.Event, t0: float,
              errors: list[str]) -> None:
    """The chaos thread: one operation every `every_s` until `stop`."""
    while not stop.wait(every_s):
        try:
            chaos.step(t0)
        except OSError as e:  # a chaos operation must never end the soak
            errors.append(f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- memory
def group_memory_kib(pgid: int) -> dict[str, int]:
    """Summed VmRSS / VmPin / VmLck (KiB) of the processes of process group `pgid`."""
    total = {"VmRSS": 0, "VmPin": 0, "VmLck": 0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in total:
                        total[key] += int(value.split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def memory_check(samples: list[dict[str, Any]], warmup_s: float, rss_budget_bytes: int,
                 host_cache_bytes: int) -> dict[str, Any]:
    """RSS stays under the budget, and after the warm-up grows by less than the host cache
    (which fills as adapters are read; anything beyond it is a leak)."""
    if not samples:
        return {"ok": False, "why": "no memory samples"}
    peak = max(s["rss_bytes"] for s in samples)
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    growth = after[-1]["rss_bytes"] - after[0]["rss_bytes"]
    return {"ok": peak <= rss_budget_bytes and growth <= host_cache_bytes,
            "rss_peak_bytes": peak, "rss_budget_bytes": rss_budget_bytes,
            "rss_growth_after_warmup_bytes": growth, "host_cache_bytes": host_cache_bytes,
            "pinned_peak_bytes": max(s.get("pinned_bytes", 0) for s in samples)}


# --------------------------------------------------------------------------- HTTP load
async def send(session: Any, url: str, p: Planned, t0: float, timeout_s: float) -> Record:
    """Send one planned request at its time; how it ended."""
    import aiohttp

    delay = t0 + p.t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.monotonic()
    rec = Record(p.t, p.model, p.stream, NO_ANSWER, None)
    try:
        async with session.post(url, json=request_body(p),
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            rec.status = resp.status
            if resp.status != 200 or not p.stream:
                body = await resp.json(content_type=None)
                message, finish, tokens = _parse_body(body)
            else:
                code, message, finish, tokens, first, hung_up = await _read_stream(resp, p.disconnect_after)
                rec.status = code or rec.status  # an error event carries the answer's status
                rec.ttft_s = None if first is None else first - start
                if hung_up:
                    rec.outcome, rec.latency_s = DISCONNECTED, time.monotonic() - start
                    return rec
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.message = f"{type(e).__name__}: {e}"
        return rec
    except Exception as e:  # noqa: BLE001 - an answer of unforeseen shape fails this request, not
        # the whole load (gather would end on it and every other request's record be lost)
        rec.outcome, rec.message = FAILED_WITHOUT_REASON, f"unreadable answer: {type(e).__name__}: {e}"
        return rec
    rec.latency_s = time.monotonic() - start
    rec.message, rec.token_ids = message, tokens
    rec.outcome = classify(p.model, rec.status, message, finish, len(tokens or []), p.max_tokens)
    return rec


def _parse_body(body: Any) -> tuple[str | None, str | None, list[int] | None]:
    """(error message, finish reason, token ids) of a non-streamed answer."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", "")), None, None
    try:
        c = body["choices"][0]
        return None, c.get("finish_reason"), list(c.get("token_ids") or [])
    except (TypeError, KeyError, IndexError):
        return f"unreadable answer: {str(body)[:200]}", None, None


def parse_events(lines: Iterable[str]) -> Iterable[dict]:
    """The JSON payloads of server-sent events (`data: {...}`), up to `data: [DONE]`."""
    for line in lines:
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _read_stream(resp: Any, disconnect_after: int | None):
    """(error event's code, its message, finish reason, token ids, time of the first token,
    hung up)."""
    code = message = finish = first = None
    tokens: list[int] = []
    chunks = 0

    async def lines():
        async for raw in resp.content:
            yield raw.decode(errors="replace")

    async for line in lines():
        for event in parse_events([line]):
            if "error" in event:
                code, message = event["error"].get("code"), str(event["error"].get("message", ""))
                continue
            c = (event.get("choices") or [{}])[0]
            new = c.get("token_ids") or []
            if new and first is None:
                first = time.monotonic()
            tokens += new
            finish = c.get("finish_reason") or finish
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                resp.close()  # the client goes away mid-stream
                return code, message, finish, tokens, first, True
    return code, message, finish, tokens, first, False


def raise_open_files_limit(target: int = 65536) -> int:
    """Lift this process's soft limit of open files towards `target` (at most the hard limit);
    the limit now. Every request in flight holds a socket: an overloaded server keeps
    rate x REQUEST_TIMEOUT_S of them open (thousands), past the usual soft limit of 1024, and
    the connections refused here ("Too many open files") would count as the server's `no_answer`
    (vLLM raises its own limit alike: vllm.utils.system_utils.set_ulimit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run_load(base_url: str, plan: Callable[[float, random.Random], Planned], arrivals: list[float],
                   seed: int, timeout_s: float) -> list[Record]:
    """Send a request at every arrival time (drawn when it is due, so that adapters the chaos
    thread added meanwhile can be chosen); every request's record, in arrival order."""
    import aiohttp

    rng = random.Random(seed)
    url = base_url + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        tasks = []
        for t in arrivals:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(session, url, plan(t, rng), t0, timeout_s)))
        return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------- solo replay
def compare_tokens(mixed: list[int], solo: list[int], solo_top: list[dict[str, float]] | None,
                   tie_tol: float) -> str:
    """"equal", "near_tie" (first divergence where the solo run's top-2 log-probabilities are
    within `tie_tol` and the mixed token is the other of them) or "mismatch"."""
    if mixed == solo:
        return "equal"
    k = next((i for i, (a, b) in enumerate(zip(mixed, solo)) if a != b), min(len(mixed), len(solo)))
    if solo_top is None or k >= len(solo_top) or k >= len(mixed):
        return "mismatch"
    top = solo_top[k] or {}
    other = top.get(f"token_id:{mixed[k]}")
    mine = top.get(f"token_id:{solo[k]}")
    if other is not None and mine is not None and abs(mine - other) <= tie_tol:
        return "near_tie"
    return "mismatch"


def replay_sample(records: list[Record], plans: dict[int, Planned], chaos: Chaos | None, k: int,
                  seed: int) -> list[int]:
    """Indices of up to `k` completed, fully read requests whose adapter was never touched by
    the chaos thread (its weights are what they were when it ran)."""
    ok = [i for i, r in enumerate(records) if r.outcome == COMPLETED and r.token_ids is not None
          and i in plans and (chaos is None or r.model not in chaos.touched)]
    return sorted(random.Random(seed).sample(ok, min(k, len(ok))))


def replay(base_url: str, records: list[Record], plans: dict[int, Planned], sample: list[int],
           tie_tol: float) -> dict[str, Any]:
    """Send each sampled request again, alone and not streamed, with top-2 log-probabilities."""
    url = base_url + "/v1/completions"
    verdicts = {"equal": 0, "near_tie": 0, "mismatch": 0, "unanswered": 0}
    examples = []
    for i in sample:
        p = plans[i]
        solo = Planned(p.t, p.model, p.prompt, p.max_tokens, False, None)
        status, body = serve.http("POST", url, request_body(solo, logprobs=2), timeout=120)
        if status != 200:
            verdicts["unanswered"] += 1
            examples.append({"request": i, "model": p.model, "solo": serve.describe(status, body)})
            continue
        c = body["choices"][0]
        top = (c.get("logprobs") or {}).get("top_logprobs")
        v = compare_tokens(records[i].token_ids or [], list(c.get("token_ids") or []), top, tie_tol)
        verdicts[v] += 1
        if v != "equal" and len(examples) < 10:
            examples.append({"request": i, "model": p.model, "verdict": v})
    return {**verdicts, "checked": len(sample), "examples": examples}


# --------------------------------------------------------------------------- pool accounting
def pool_accounting(metrics_text: str, running: float | None, waiting: float | None) -> dict[str, Any]:
    """From /metrics after the load drained: pages held by KV (leaked: nothing runs) and the
    sum free + KV + adapters against the total."""
    m = {k: serve.metric_sum(metrics_text, f"slora:{k}")
         for k in ("pages_total", "pages_free", "pages_kv", "pages_adapters")}
    if any(v is None for v in m.values()):
        return {"ok": False, "why": f"slora:* page gauges missing: {m}", "leaked_pages": None}
    idle = not running and not waiting
    leaked = int(m["pages_kv"]) if idle else None
    exact = m["pages_free"] + m["pages_kv"] + m["pages_adapters"] == m["pages_total"]
    return {"ok": bool(idle and exact and leaked == 0), "idle": idle, "sum_exact": exact,
            "leaked_pages": leaked, **{k: int(v) for k, v in m.items()}}


# --------------------------------------------------------------------------- the servers
def soak_command(model_dir: str, adapter_dir: str | None, port: int, max_model_len: int,
                 gpu_memory_utilization: float) -> list[str]:
    """`vllm serve` on the soak model; with the plugin when `adapter_dir` is given, else stock
    vLLM without LoRA (the base model the rate is measured on)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
           "--served-model-name", SERVED_NAME, "--load-format", "dummy", "--dtype", "float16",
           "--skip-tokenizer-init", "--return-tokens-as-token-ids",
           "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
           "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    if adapter_dir is not None:
        slora = {"adapter_dir": adapter_dir, "max_lora_rank": MAX_LORA_RANK,
                 "host_cache_bytes": HOST_CACHE_BYTES}
        cmd += ["--additional-config", json.dumps({"slora": slora})]
    return cmd


def synth_adapters(directory: str, model_dir: str, count: int, distinct: int) -> list[str]:
    """`slora-plugin adapters synth` (the CLI, as an operator runs it) into a fresh `directory`;
    the names written. Never reused: an earlier soak's chaos left adapters deleted, truncated,
    replaced and added there, whose failures this run would count against untouched names."""
    shutil.rmtree(directory, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "slora_plugin.cli", "adapters", "synth", directory,
                    "--count", str(count), "--ranks", "8,16,32,64", "--model", model_dir,
                    "--distinct", str(distinct)], check=True)
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


class Monitor(threading.Thread):
    """Every `every_s`: is the server alive (its process, /health), and its memory."""

    def __init__(self, server: Any, base_url: str, t0: float, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.server, self.base_url, self.t0, self.every_s = server, base_url, t0, every_s
        self.stop_event = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.crashes = 0
        self.health_failures = 0

    def run(self) -> None:
        while True:  # a sample at once, then one every `every_s`
            if self.server.proc.poll() is not None:
                self.crashes = 1
                return
            status, _ = serve.http("GET", self.base_url + "/health", timeout=10)
            self.health_failures += status != 200
            mem = group_memory_kib(self.server.proc.pid)
            self.samples.append({"t_s": round(time.monotonic() - self.t0, 1),
                                 "rss_bytes": mem["VmRSS"] * 1024,
                                 "pinned_bytes": (mem["VmPin"] + mem["VmLck"]) * 1024,
                                 "health": status})
            if self.stop_event.wait(self.every_s):
                return


def start_server(cmd: list[str], env: dict[str, str], log_path: str, cwd: str, start_timeout_s: float):
    """A `gpu_serve.Server` and whether it became ready."""
    os.makedirs(cwd, exist_ok=True)
    server = serve.Server(cmd, env, log_path, cwd)
    port = cmd[cmd.index("--port") + 1]
    ready = serve.wait_ready(server, f"http://127.0.0.1:{port}", start_timeout_s)
    return server, f"http://127.0.0.1:{port}", ready


def measure_stock_rate(work: str, model_dir: str, rates: list[float], probe_s: float, mix: Mix,
                       slo_s: float, args: argparse.Namespace, stock: dict[str, Any], log_path: str,
                       deadline: float | None = None) -> None:
    """Find the highest of `rates` stock vLLM sustains on the base model (each tried for `probe_s`
    with the soak's lengths), stopping at the first it does not, into `stock` (the result's
    "stock_rate"), filled as each probe ends, so that a run killed by its time limit still
    leaves the best rate so far for `--rate-from`; no probe starts that could end past
    `deadline` (time.monotonic()): start-up and the probes are what fills gpu_run.sh's limit."""
    stock.update(rate=None, probes=[], slo_s=slo_s, probe_s=probe_s)
    # A request slower than this is past any p99 the SLO allows: bounding it bounds a probe's drain.
    timeout_s = min(REQUEST_TIMEOUT_S, 3 * slo_s)
    left = (lambda: deadline - time.monotonic()) if deadline is not None else (lambda: math.inf)
    port = serve.free_port()
    cmd = soak_command(model_dir, None, port, args.max_model_len, args.gpu_memory_utilization)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SLORA")}
    server, base_url, ready = start_server(cmd, env, log_path, os.path.join(work, "cwd"),
                                           max(1.0, min(args.start_timeout, left() - probe_s - timeout_s)))
    try:
        if not ready.ok:
            stock["why"] = ready.got
            stock["server_log_tail"] = server.log_text().splitlines()[-40:]
            return
        for rate in rates:
            if left() < probe_s + timeout_s:
                stock["stopped"] = f"deadline: {left():.0f} s left, a probe takes up to {probe_s + timeout_s:.0f} s"
                break
            rng = random.Random(int(rate * 1000))
            arrivals = poisson_arrivals(rate, probe_s, rng)
            records = asyncio.run(run_load(base_url, lambda t, r: plan_request(t, None, mix, r), arrivals,
                                           seed=int(rate), timeout_s=timeout_s))
            ok = sustained(records, slo_s)
            stock["probes"].append({"rate": rate, "sustained": ok, **tally(records)})
            print(f"[soak] stock at {rate} req/s: {'sustained' if ok else 'not sustained'} "
                  f"(p99 {stock['probes'][-1]['p99_latency_s']})", flush=True)
            if not ok:
                break
            stock["rate"] = rate
    finally:
        server.stop()


def plot_windows(windows: list[dict[str, Any]], path: str) -> str | None:
    """p50/p99 latency and TTFT per window (PNG), if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    t = [w["t0_s"] for w in windows]
    for key, style in (("p50_latency_s", "-"), ("p99_latency_s", "-"), ("p50_ttft_s", "--"), ("p99_ttft_s", "--")):
        ax.plot(t, [w[key] if w[key] is not None else float("nan") for w in windows], style, label=key)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("soak: latency per window")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main
def soak(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Everything after the rate is known; fills `result` as it goes."""
    from slora_plugin.model_config import load_model_config, load_model_dims, write_model_config

    work = args.work_dir
    model_dir = write_model_config(os.path.join(work, "model"), load_model_config(args.model_config))
    dims = load_model_dims(model_dir)
    adapter_dir = os.path.join(work, "adapters")
    names = synth_adapters(adapter_dir, model_dir, args.adapters, args.distinct)
    result["adapters"] = len(names)
    mix = mix_of(args)
    popularity = Popularity(random.Random(args.seed).sample(names, len(names)), mix.alpha)
    metrics_dir = os.path.join(work, "prometheus")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir)
    port = serve.free_port()
    cmd = soak_command(model_dir, adapter_dir, port, args.max_model_len, args.gpu_memory_utilization)
    result["command"] = cmd
    server, base_url, ready = start_server(cmd, serve.serve_env(dict(os.environ), metrics_dir),
                                           args.log or os.path.join(work, "server.log"),
                                           os.path.join(work, "cwd"), args.start_timeout)
    result["server_ready"] = asdict(ready)
    if not ready.ok:
        result["server_crashes"] = 1
        server.stop()
        return
    t0 = time.monotonic()
    monitor = Monitor(server, base_url, t0, args.monitor_every_s)
    chaos = Chaos(adapter_dir, dims, random.Random(args.seed + 1), popularity)
    stop_chaos = threading.Event()
    chaos_errors: list[str] = []
    chaos_thread = threading.Thread(target=run_chaos, args=(chaos, args.chaos_every_s, stop_chaos, t0,
                                                             chaos_errors), daemon=True)
    plans: dict[int, Planned] = {}
    arrivals = poisson_arrivals(args.rate, args.duration_s, random.Random(args.seed))

    def plan(t: float, rng: random.Random) -> Planned:
        p = plan_request(t, popularity, mix, rng)
        plans[len(plans)] = p
        return p

    try:
        monitor.start()
        chaos_thread.start()
        records = asyncio.run(run_load(base_url, plan, arrivals, seed=args.seed + 2,
                                       timeout_s=REQUEST_TIMEOUT_S))
        stop_chaos.set()
        chaos_thread.join()
        for r in records:  # touched before it was answered: its failure may be the chaos's doing
            r.touched = chaos.was_touched(r.model, t0 + r.t + (r.latency_s or REQUEST_TIMEOUT_S))
        result.update(tally(records))
        result["latency_windows"] = latency_windows(records, args.window_s)
        result["chaos"] = {"ops": chaos.counts(), "errors": chaos_errors[:20], "log": chaos.log}
        result["failure_examples"] = [
            {"model": r.model, "outcome": r.outcome, "status": r.status, "message": (r.message or "")[:300]}
            for r in records if r.outcome in (FAILED_WITHOUT_REASON, NO_ANSWER)][:20]
        result["reason_examples"] = sorted({(r.message or "")[:200] for r in records
                                            if r.outcome == FAILED_WITH_REASON})[:10]
        sample = replay_sample(records, plans, chaos, args.replay, args.seed + 3)
        result["replay"] = replay(base_url, records, plans, sample, args.tie_tol)
        result["token_mismatches"] = result["replay"]["mismatch"]
        # settle: one request through the idle server, then the pool's gauges
        serve.http("POST", base_url + "/v1/completions",
                   request_body(Planned(0, SERVED_NAME, (5, 6, 7), 1, False, None)), timeout=60)
        time.sleep(2.0)
        status, text = serve.http("GET", base_url + "/metrics", timeout=30)
        body = text if isinstance(text, str) else ""
        result["pool"] = pool_accounting(body, serve.metric_sum(body, "vllm:num_requests_running"),
                                         serve.metric_sum(body, "vllm:num_requests_waiting"))
        result["leaked_pages"] = result["pool"]["leaked_pages"]
    finally:
        monitor.stop_event.set()
        stop_chaos.set()
        result["server_crashes"] = int(monitor.crashes or server.proc.poll() is not None)
        result["health_failures"] = monitor.health_failures
        result["memory"] = memory_check(monitor.samples, args.warmup_s, int(args.rss_budget_gib * 2**30),
                                        HOST_CACHE_BYTES)
        result["memory_samples"] = monitor.samples
        server.stop()
        result["server_log_tail"] = server.log_text().splitlines()[-40:]


def verdict(result: dict[str, Any]) -> list[str]:
    """The checks that failed (empty: the soak passed)."""
    failed = []
    for key, want in (("server_crashes", 0), ("failed_without_reason", 0), ("no_answer", 0),
                      ("failed_untouched", 0), ("failed_base_model", 0), ("token_mismatches", 0),
                      ("leaked_pages", 0)):
        if result.get(key) != want:
            failed.append(f"{key} = {result.get(key)} (want {want})")
    if result.get("replay", {}).get("unanswered"):  # a replay that is not answered checks nothing
        failed.append(f"replay unanswered = {result['replay']['unanswered']} (want 0): "
                      f"{result['replay']['examples'][:3]}")
    if not result.get("pool", {}).get("ok"):
        failed.append(f"pool accounting: {result.get('pool')}")
    if not result.get("memory", {}).get("ok"):
        failed.append(f"memory: {result.get('memory')}")
    return failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/dev/shm/slora-soak")
    ap.add_argument("--log", help="server log (default WORK_DIR/server.log)")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/soak-DATE.json)")
    ap.add_argument("--model-config", default=LLAMA2_CONFIG_DIR)
    ap.add_argument("--adapters", type=int, default=NUM_ADAPTERS)
    ap.add_argument("--distinct", type=int, default=4)
    ap.add_argument("--rate", default="auto", help="requests/s, or 'auto' (measure stock vLLM first)")
    ap.add_argument("--rate-from", help="a result JSON with stock_rate.rate (from --measure-only)")
    ap.add_argument("--measure-only", action="store_true", help="measure the stock rate and stop")
    ap.add_argument("--probe-rates", default="2,4,6,8,10,12,16,20,24,32")
    ap.add_argument("--probe-s", type=float, default=45.0)
    ap.add_argument("--slo-s", type=float, default=20.0, help="p99 latency a sustained rate keeps")
    ap.add_argument("--duration-s", type=float, default=DURATION_S)
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of popularity")
    ap.add_argument("--prompt-len", default=f"{PROMPT_LEN[0]}-{PROMPT_LEN[1]}", help="tokens, MIN-MAX")
    ap.add_argument("--output-len", default=f"{OUTPUT_LEN[0]}-{OUTPUT_LEN[1]}", help="tokens, MIN-MAX")
    ap.add_argument("--chaos-every-s", type=float, default=2.0)
    ap.add_argument("--replay", type=int, default=100, help="completed requests replayed alone")
    ap.add_argument("--tie-tol", type=float, default=0.02)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--monitor-every-s", type=float, default=5.0, help="health and memory samples")
    ap.add_argument("--rss-budget-gib", type=float, default=48.0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--deadline-s", type=float,
                    help="--measure-only / auto: start no probe that could end later than this many "
                         "seconds after the start (gpu_run.sh kills the step at its limit)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def mix_of(args: argparse.Namespace) -> Mix:
    def span(text: str) -> tuple[int, int]:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)

    from slora_plugin.model_config import load_model_config

    return Mix(alpha=args.alpha, prompt_len=span(args.prompt_len), output_len=span(args.output_len),
               vocab_size=int(load_model_config(args.model_config).get("vocab_size", 32000)))


def _terminate(signum, frame):
    for server in list(serve.Server.running):
        server.kill()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline_s if args.deadline_s is not None else None
    open_files = raise_open_files_limit()
    signal.signal(signal.SIGTERM, _terminate)
    os.makedirs(args.work_dir, exist_ok=True)
    day = _dt.date.today().isoformat()
    out = args.out or os.path.join(RESULTS, f"soak-{'rate-' if args.measure_only else ''}{day}.json")
    result: dict[str, Any] = {"date": day, "device": serve.device_name(), "duration_s": args.duration_s,
                              "open_files_limit": open_files}
    try:
        missing = serve.missing_modules(serve.SERVE_MODULES + ("aiohttp",))
        if missing:
            raise RuntimeError(f"missing modules {missing}")
        if args.rate_from:
            with open(args.rate_from) as f:
                result["stock_rate"] = json.load(f)["stock_rate"]
        elif args.rate == "auto" or args.measure_only:
            from slora_plugin.model_config import load_model_config, write_model_config

            model_dir = write_model_config(os.path.join(args.work_dir, "model"), load_model_config(args.model_config))
            result["stock_rate"] = {}
            measure_stock_rate(
                args.work_dir, model_dir, [float(r) for r in args.probe_rates.split(",")], args.probe_s,
                mix_of(args), args.slo_s, args, result["stock_rate"],
                args.log if args.measure_only and args.log else os.path.join(args.work_dir, "stock-server.log"),
                deadline)
        rate = result["stock_rate"].get("rate") if "stock_rate" in result else float(args.rate)
        result["rate"] = rate
        if not args.measure_only:
            if not rate:
                raise RuntimeError(f"no rate to run at: {result.get('stock_rate')}")
            args.rate = rate
            soak(args, result)
            result["plot"] = plot_windows(result.get("latency_windows") or [], out[:-len(".json")] + ".png")
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the result says what stopped the soak
        result["stopped_by"] = f"{type(e).__name__}: {e}"
    if args.measure_only:  # the soak step runs at this rate: no rate is a failure
        result["failed_checks"] = [] if result.get("rate") else [f"no sustained rate: {result.get('stock_rate')}"]
    else:
        result["failed_checks"] = verdict(result)
    if "stopped_by" in result:
        result["failed_checks"].insert(0, result["stopped_by"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    summary = {k: result.get(k) for k in ("rate", "requests", "completed", "failed_with_reason",
                                          "failed_without_reason", "server_crashes", "leaked_pages",
                                          "token_mismatches", "p50_latency_s", "p99_latency_s")}
    print(json.dumps(summary), "\n".join(result["failed_checks"]) or "all checks passed", f"wrote {out}",
          sep="\n")
    return 0 if not result["failed_checks"] else 1


if __name__ == "__main__":
    sys.exit(main())
