"""Issue 17: an engine with the plugin and CUDA graphs starts, serves adapters and exits cleanly,
20 times in a row. One of three correctness runs on the H100 (2026-12-05) aborted at exit
(SIGABRT, "terminate called without an active exception", exit -6) after producing correct
tokens. Each run here is its own process doing what that run did (benchmarks/gpu_correctness.py:
the correctness fixture's model and adapters, `LLM(...)` with graphs, one mixed batch) and then
simply ending, so that the engine is torn down as it was there: by the interpreter's exit.
Skipped without a CUDA GPU; `bash benchmarks/gpu_run.sh teardown` runs it (~20 engine starts).

On 2026-12-06 the eager run of `gpu_run.sh compress-correctness` (an adapter directory holding a
compressed collection beside the plain adapters, `enforce_eager`) aborted the same way twice in a
row: `test_engine_restarts_compressed_eager_exit_cleanly` repeats that case
(`gpu_run.sh teardown-compressed`, SLORA_TEARDOWN_COMPRESSED_RUNS runs, default 5).

A run is abnormal when its process exits non-zero or by a signal, when any process of its engine
(the front end or vLLM's EngineCore, which share its output) prints an abort or a crash, when it
never reports its batch, or when a process of its group outlives it. Each run is its own process
group, killed whole when it hangs, outlives the run or the test is stopped (SIGTERM), so that no
engine is left holding GPU memory for the steps after it. The test stops starting engines when
the next would not end within SLORA_TEARDOWN_BUDGET_S (gpu_run.sh sets it below its `timeout`),
and fails naming how many ran, instead of being killed with nothing reported. The CPU tests at
the end run this harness with stand-in engines."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "benchmarks", "fixtures", "correctness")
#: Seconds one engine may take from start to exit before it counts as hung.
RUN_TIMEOUT_S = 240
#: Default SLORA_TEARDOWN_BUDGET_S: gpu_run.sh's `timeout 570` less pytest's start-up and the report.
BUDGET_S = 530
#: Seconds the processes of a run's group get to end after its front end exited (vLLM's own
#: shutdown waits 5 s for EngineCore before it kills it) before they count as left over.
GRACE_S = 15.0
#: KV cache of each engine when several run at once. vLLM 0.26 sizes the cache by profiling the
#: device's free memory from worker start to the end of the profile run (v1/worker/gpu_worker.py,
#: determine_available_memory; utils/mem_utils.py counts all processes' memory): another engine
#: allocating its cache in that window shrinks this one's to nothing, one exiting in it fails the
#: assertion "Error in memory profiling". A fixed size skips that profiling; the check that the
#: free memory covers gpu_memory_utilization (0.25 each) still runs. Serial runs keep profiling.
PARALLEL_KV_CACHE_BYTES = 2 << 30
#: Printed by an engine process that aborts or crashes: libstdc++'s std::terminate, and
#: faulthandler (PYTHONFAULTHANDLER, inherited by EngineCore) on SIGABRT, SIGSEGV and the like.
#: EngineCore's own exit status is not the run's: vLLM's shutdown does not check it.
ABNORMAL_MARKS = ("terminate called", "Fatal Python error")
#: Why the harness killed a run: it hung, or the test's time budget ran out while it ran.
HUNG, AT_BUDGET = "hung", "killed at the test's time budget"

# argv: model dir, adapter dir, "eager" or "graphs", KV cache bytes (0: profiled), adapter names
CHILD = r"""
import os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

model, adapters, mode, kv_bytes, names = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
llm = LLM(model, dtype="float16", enforce_eager=mode == "eager",
          skip_tokenizer_init=True, max_model_len=128, gpu_memory_utilization=0.25,
          kv_cache_memory_bytes=kv_bytes or None, seed=0,
          additional_config={"slora": {"adapter_dir": adapters, "max_lora_rank": 16,
                                       "max_adapters_per_step": 16}})
loras = [None] + [LoRARequest(n, i + 1, os.path.join(adapters, n)) for i, n in enumerate(names)]
out = llm.generate([TokensPrompt(prompt_token_ids=[5 + i, 6, 7, 8]) for i in range(len(loras))],
                   SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False),
                   lora_request=loras)
assert all(len(o.outputs[0].token_ids) == 8 for o in out), out
print("GENERATED", len(out), flush=True)
"""


class Terminated(Exception):
    """SIGTERM reached the test (gpu_run.sh's `timeout`): the engines in flight were killed."""


@dataclasses.dataclass
class Run:
    """One engine process: how it ended and why that is abnormal (`problem`, None if clean)."""

    index: int
    returncode: int
    start: float  # time.monotonic()
    seconds: float
    log: str
    output: str
    problem: str | None

    def summary(self) -> str:
        return f"run {self.index:2d}: {self.problem or 'clean'} ({self.seconds:.1f} s; {self.log})"


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment (unset or empty: `default`). Zero runs would pass
    having tested nothing, zero lanes would start none: refused like text."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: give a positive integer")
    return int(raw)


def child_cmd(model: str, adapters: str, eager: bool, parallel: int, names: list[str]) -> list[str]:
    """CHILD's command line; engines side by side get PARALLEL_KV_CACHE_BYTES each."""
    kv_bytes = PARALLEL_KV_CACHE_BYTES if parallel > 1 else 0
    return [sys.executable, "-c", CHILD, model, adapters, "eager" if eager else "graphs", str(kv_bytes), *names]


def served_names(adapters: str) -> list[str]:
    """The adapters the plugin lists in `adapters` (plain ones, and `coll/<name>` for those of a
    compressed collection `coll/`): only adapter directories, never a stray file."""
    from slora_plugin.adapters.index import AdapterIndex

    return AdapterIndex(adapters).scan()


def compressed_adapter_dir(root: str, log_dir: str) -> str:
    """`root`/adapters: a copy of the fixture's adapters with, as `coll/`, a collection compressed
    from them by `slora-plugin adapters compress --rank 50` (exact: the largest sum of ranks of
    one module), the command gpu_run.sh's compress-correctness runs. Its own process, so that
    the test's process never holds a CUDA context beside the engines."""
    import shutil

    src = os.path.join(FIXTURE, "adapters")
    adapters = os.path.join(root, "adapters")
    shutil.copytree(src, adapters)  # copies: the adapter index refuses links leading outside it
    cmd = [sys.executable, "-m", "slora_plugin.cli", "adapters", "compress", src, os.path.join(adapters, "coll"),
           "--rank", "50", "--model", os.path.join(FIXTURE, "model")]
    done = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", timeout=180)
    with open(os.path.join(log_dir, "compress.log"), "w") as f:
        f.write(done.stdout)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-4000:]}"
    return adapters


def _live_group(pid: int) -> int | None:
    """The process group of `pid` while it runs; None once it ended. Zombies count as ended:
    where the machine's init never reaps an orphan that vLLM killed, signalling it would always
    succeed."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
    return None if state in ("Z", "X") else int(pgrp)


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` not yet ended."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _live_group(int(e)) == pgid]


def _end_group(pgid: int, grace_s: float) -> int:
    """Wait up to `grace_s` for group `pgid` to end, kill what is left; how many were left."""
    deadline = time.monotonic() + grace_s
    while (left := _live_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def _problem(returncode: int, killed: str, leftovers: int, output: str, expected: str) -> str | None:
    if killed:
        return killed
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a signal without a name (real-time ones)
            return f"killed by signal {-returncode}"
    if returncode:
        return f"exit {returncode}"
    marks = [m for m in ABNORMAL_MARKS if m in output]
    if marks:
        return f"exit 0, but an engine process printed {marks}"
    if expected not in output:
        return f"exit 0 without printing {expected!r}"
    if leftovers:
        return f"{leftovers} process(es) of its group still running {GRACE_S:.0f} s after it exited (killed)"
    return None


def _estimate(results: list[Run]) -> float:
    """How long the next run may take: the longest run after the first (whose cold torch.compile
    and Triton caches make it the slowest), or the first while it is the only one."""
    warm = [r.seconds for r in results if r.index > 0]
    return max(warm or [r.seconds for r in results] or [0.0])


def run_engines(cmd: list[str], runs: int, parallel: int, expected: str, *, cwd: str, log_dir: str,
                budget_s: float, run_timeout_s: float = RUN_TIMEOUT_S, grace_s: float = GRACE_S) -> list[Run]:
    """Run `cmd` `runs` times, `parallel` at once, each in its own process group with its output in
    `log_dir`/run-NN.log; a run is clean when it exits 0 having printed `expected` and nothing
    of ABNORMAL_MARKS, and its group ends with it. The first runs alone: it fills vLLM's
    torch.compile cache, whose index vLLM writes in place (compilation/backends.py,
    `save_to_file`), where a second engine starting at that moment could read half a file. No run
    starts unless the longest so far would still end within `budget_s`; one still running then is
    killed (AT_BUDGET). SIGTERM raises Terminated once the runs in flight are killed."""
    deadline = time.monotonic() + budget_s
    results: list[Run] = []
    live: dict[int, int] = {}  # run index -> process group, while it runs
    lock = threading.Lock()
    todo = iter(range(runs))
    first_done, stop = threading.Event(), threading.Event()

    def one(i: int) -> Run | None:
        log_path = os.path.join(log_dir, f"run-{i:02d}.log")
        with open(log_path, "wb") as log:
            with lock:  # started and registered together, or not at all once stopping
                if stop.is_set():
                    return None
                start = time.monotonic()
                limit = min(run_timeout_s, deadline - start)
                proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
                live[i] = proc.pid
            killed = ""
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = f"{HUNG}: still running after {limit:.0f} s (killed)" if limit >= run_timeout_s else AT_BUDGET
            seconds = time.monotonic() - start
            leftovers = _end_group(proc.pid, grace_s)
            with lock:
                live.pop(i, None)
        with open(log_path, errors="replace") as f:
            output = f.read()
        problem = _problem(proc.returncode, killed, leftovers, output, expected)
        return Run(i, proc.returncode, start, seconds, log_path, output, problem)

    def lane(waits: bool) -> None:
        if waits:
            first_done.wait()
        while not stop.is_set():
            with lock:
                i = next(todo, None) if time.monotonic() + _estimate(results) <= deadline else None
            run = one(i) if i is not None else None
            first_done.set()
            if run is None:
                return
            with lock:
                results.append(run)
            print(run.summary(), flush=True)

    def terminated(signum: int, frame: types.FrameType | None) -> None:
        raise Terminated(f"{signal.Signals(signum).name} after {len(results)} of {runs} runs")

    os.makedirs(log_dir, exist_ok=True)
    lanes = [threading.Thread(target=lane, args=(n > 0,), daemon=True) for n in range(parallel)]
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    finally:
        with lock:
            stop.set()
            groups = list(live.values())
        first_done.set()
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for t in lanes:
            t.join()
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return sorted(results, key=lambda r: r.index)


def verdict(results: list[Run], runs: int, budget_s: float) -> str | None:
    """The failure message (None: all `runs` ran and were clean): every abnormal run, and the
    tail of the first one's output (its whole output is in its log)."""
    bad = [r for r in results if r.problem]
    if not bad and len(results) == runs:
        return None
    lines = [f"{len(bad)} of {len(results)} runs abnormal; {len(results)} of {runs} started within the "
             f"{budget_s:.0f} s budget (SLORA_TEARDOWN_BUDGET_S)"]
    lines += [r.summary() for r in bad]
    first = next((r for r in bad if r.problem != AT_BUDGET), None)
    if first is not None:
        lines += [f"--- run {first.index}, the last 6000 characters of {first.log}:", first.output[-6000:]]
    return "\n".join(lines)


def _log_dir(tmp_path) -> str:
    log_dir = os.environ.get("SLORA_TEARDOWN_LOG_DIR") or str(tmp_path / "runs")
    os.makedirs(log_dir, exist_ok=True)
    return log_dir


def _restarts(tmp_path, log_dir: str, adapters: str, eager: bool, runs: int, started: float) -> None:
    """`runs` engines over every adapter of `adapters`, SLORA_TEARDOWN_PARALLEL at once, each
    clean, within what is left of the budget since `started`. cwd tmp_path, not the repository
    root: its folders would shadow the installed packages."""
    parallel = env_int("SLORA_TEARDOWN_PARALLEL", 1)
    names = served_names(adapters)
    cmd = child_cmd(os.path.join(FIXTURE, "model"), adapters, eager, parallel, names)
    budget_s = env_int("SLORA_TEARDOWN_BUDGET_S", BUDGET_S) - (time.monotonic() - started)
    results = run_engines(cmd, runs, parallel, f"GENERATED {len(names) + 1}\n", cwd=str(tmp_path),
                          log_dir=log_dir, budget_s=budget_s)
    message = verdict(results, runs, budget_s)
    assert message is None, message


@pytest.mark.gpu
def test_engine_restarts_with_cuda_graphs_exit_cleanly(tmp_path):
    started = time.monotonic()
    _restarts(tmp_path, _log_dir(tmp_path), os.path.join(FIXTURE, "adapters"), False,
              env_int("SLORA_TEARDOWN_RUNS", 20), started)


@pytest.mark.gpu
def test_engine_restarts_compressed_eager_exit_cleanly(tmp_path):
    """The fixture's adapters beside a collection compressed from them (K = 50, exact, as
    `gpu_run.sh compress-correctness` makes it), served eagerly: plain and `coll/<name>` in one batch."""
    started = time.monotonic()
    runs = env_int("SLORA_TEARDOWN_COMPRESSED_RUNS", 5)
    log_dir = _log_dir(tmp_path)
    adapters = compressed_adapter_dir(str(tmp_path), log_dir)
    plain = served_names(os.path.join(FIXTURE, "adapters"))
    names = served_names(adapters)
    assert names == sorted(plain + [f"coll/{n}" for n in plain]), names  # each adapter also from the collection
    _restarts(tmp_path, log_dir, adapters, True, runs, started)


# --------------------------------------------------------------------------- the harness on the CPU
def _engine(body: str) -> list[str]:
    """A stand-in engine process running the Python `body`."""
    return [sys.executable, "-c", "import os, subprocess, sys, time\n" + body]


def _engines(tmp_path, body: str, runs: int = 1, parallel: int = 1, **kw) -> list[Run]:
    kw.setdefault("budget_s", 60.0)
    return run_engines(_engine(body), runs, parallel, "GENERATED 1\n", cwd=str(tmp_path),
                       log_dir=str(tmp_path / "runs"), **kw)


@pytest.mark.parametrize("raw, want", [(None, 7), ("", 7), (" 3 ", 3), ("0", None), ("-2", None), ("x", None)])
def test_env_int_refuses_what_would_test_nothing(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("SLORA_TEARDOWN_X", raising=False)
    else:
        monkeypatch.setenv("SLORA_TEARDOWN_X", raw)
    if want is None:
        with pytest.raises(ValueError, match="SLORA_TEARDOWN_X"):
            env_int("SLORA_TEARDOWN_X", 7)
    else:
        assert env_int("SLORA_TEARDOWN_X", 7) == want


def test_clean_runs_side_by_side_after_a_first_one_alone(tmp_path):
    results = _engines(tmp_path, "time.sleep(0.3); print('GENERATED', 1)", runs=5, parallel=2)
    assert [r.index for r in results] == list(range(5)) and not [r for r in results if r.problem]
    assert verdict(results, 5, 60.0) is None
    first, rest = results[0], results[1:]
    assert all(r.start >= first.start + first.seconds for r in rest)  # the first ran alone
    assert any(a.start < b.start + b.seconds and b.start < a.start + a.seconds  # then two at once
               for a in rest for b in rest if a is not b)


@pytest.mark.parametrize("body, problem", [
    ("print('GENERATED', 1, flush=True); os.abort()", "killed by SIGABRT"),
    ("print('GENERATED', 1); sys.exit(3)", "exit 3"),
    ("import signal; os.kill(os.getpid(), signal.SIGRTMIN + 2)", "killed by signal"),
    ("print('done')", "without printing"),
    # vLLM's EngineCore aborting at exit while the front end exits 0 (its status is not checked)
    ("subprocess.call([sys.executable, '-c', 'import os; os.abort()']); print('GENERATED', 1)",
     "printed ['Fatal Python error']"),
    ("print('GENERATED', 1); sys.stderr.write('terminate called without an active exception\\n')",
     "printed ['terminate called']"),
])
def test_an_abnormal_run_fails_with_its_output(tmp_path, body, problem):
    [run] = _engines(tmp_path, body)
    assert problem in run.problem
    message = verdict([run], 1, 60.0)
    assert message is not None and problem in message and run.log in message
    if "abort" in body:  # faulthandler's stacks (PYTHONFAULTHANDLER, set by the harness) are in it
        assert "Fatal Python error: Aborted" in message


def test_a_process_outliving_its_run_is_killed_and_fails_it(tmp_path):
    pid_file = tmp_path / "pid"
    body = (f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
            "print('GENERATED', 1)")
    [run] = _engines(tmp_path, body, grace_s=0.3)
    assert "still running" in run.problem
    time.sleep(0.2)
    assert _live_group(int(pid_file.read_text())) is None


def test_a_hung_run_is_killed_with_its_whole_group(tmp_path):
    pid_file = tmp_path / "pid"
    body = f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    started = time.monotonic()
    [run] = _engines(tmp_path, body, run_timeout_s=1.0)
    assert run.problem.startswith(HUNG) and time.monotonic() - started < 20
    time.sleep(0.2)
    assert _live_group(int(pid_file.read_text())) is None


def test_no_run_starts_that_would_end_after_the_budget(tmp_path):
    results = _engines(tmp_path, "time.sleep(0.5); print('GENERATED', 1)", runs=20, budget_s=2.0)
    assert 1 <= len(results) < 20 and not [r for r in results if r.problem]
    message = verdict(results, 20, 2.0)
    assert message is not None and f"{len(results)} of 20 started within the 2 s budget" in message
    [killed] = _engines(tmp_path, "time.sleep(60)", run_timeout_s=30.0, budget_s=1.0)
    assert killed.problem == AT_BUDGET


def test_sigterm_kills_the_runs_in_flight(tmp_path):
    """gpu_run.sh's `timeout` signals pytest's process group, which the engines' groups are not."""
    pid_file = tmp_path / "pid"
    engine = f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    harness = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
               "import test_teardown_gpu as t\n"
               "try:\n"
               f"    t.run_engines(t._engine({engine!r}), 2, 2, 'x', cwd={str(tmp_path)!r},\n"
               f"                  log_dir={str(tmp_path / 'runs')!r}, budget_s=60)\n"
               "except t.Terminated as e:\n"
               "    print('TERMINATED', e)\n")
    proc = subprocess.Popen([sys.executable, "-c", harness], cwd=str(tmp_path), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "TERMINATED SIGTERM" in out and proc.returncode == 0
    time.sleep(0.2)
    assert _live_group(int(pid_file.read_text())) is None


@pytest.mark.parametrize("parallel", [1, 2])
def test_child_requests_every_adapter_with_args_vllm_takes(monkeypatch, capsys, parallel):
    """CHILD against stand-ins for vLLM: each name is requested, with its path, and every keyword
    is one of vLLM's EngineArgs (LLM passes them there; an unknown one fails every engine)."""
    from vllm.engine.arg_utils import EngineArgs

    capsys.readouterr()  # vLLM's import-time log lines
    seen: dict = {}

    class LLM:
        def __init__(self, model, **kwargs):
            seen.update(kwargs, model=model)

        def generate(self, prompts, params, lora_request):
            seen["loras"] = lora_request
            token_ids = list(range(params.max_tokens))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=token_ids)]) for _ in prompts]

    fakes = {"vllm": types.SimpleNamespace(LLM=LLM, SamplingParams=types.SimpleNamespace),
             "vllm.inputs": types.SimpleNamespace(TokensPrompt=dict),
             "vllm.lora.request": types.SimpleNamespace(LoRARequest=lambda *a: a)}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    names = ["a", "coll/a"]
    cmd = child_cmd("/m", "/ad", True, parallel, names)
    monkeypatch.setattr(sys, "argv", ["-c", *cmd[3:]])
    exec(compile(cmd[2], "<child>", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == f"GENERATED {len(names) + 1}\n"
    assert seen["loras"] == [None, ("a", 1, "/ad/a"), ("coll/a", 2, "/ad/coll/a")]
    assert seen["kv_cache_memory_bytes"] == (PARALLEL_KV_CACHE_BYTES if parallel > 1 else None)
    assert seen["enforce_eager"] and seen["gpu_memory_utilization"] * parallel <= 0.5
    kwargs = set(seen) - {"model", "loras"}
    assert kwargs <= {f.name for f in dataclasses.fields(EngineArgs)}


def test_compressed_directory_serves_each_adapter_from_the_collection(tmp_path):
    """What the compressed GPU test serves: the CLI's collection holds every fixture adapter, the
    plugin lists each as `coll/<name>` and reads it as a compressed adapter."""
    from slora_plugin.adapters.cli import check_directory, model_dims
    from slora_plugin.adapters.compressed import split_path

    adapters = compressed_adapter_dir(str(tmp_path), str(tmp_path))
    plain = served_names(os.path.join(FIXTURE, "adapters"))
    names = served_names(adapters)
    assert len(plain) == 8 and names == sorted(plain + [f"coll/{n}" for n in plain])
    assert check_directory(adapters, model_dims(os.path.join(FIXTURE, "model"))) == (16, [])
    for n in plain:
        assert split_path(os.path.join(adapters, "coll", n)) == (os.path.join(adapters, "coll"), n)
    assert "8 adapters -> rank 50" in (tmp_path / "compress.log").read_text()


def test_gpu_run_names_these_tests_and_a_budget_inside_its_timeout():
    import re

    text = open(os.path.join(REPO, "benchmarks", "gpu_run.sh")).read()
    step = re.search(r"\n\s+teardown\|teardown-compressed\)\n(.*?);;", text, re.S).group(1)
    named = re.findall(r"test=(test_\w+)", step)
    assert sorted(named) == sorted(n for n, f in globals().items()
                                   if n.startswith("test_") and any(m.name == "gpu" for m in
                                                                    getattr(f, "pytestmark", [])))
    assert "test_teardown_gpu.py::$test" in step and "-m gpu" in step
    limit = int(re.search(r"limit=(\d+)", step).group(1))
    assert "timeout -k 10 $limit" in step
    margin = int(re.search(r"SLORA_TEARDOWN_BUDGET_S:-\$\(\(limit - (\d+)\)\)", step).group(1))
    assert limit - margin == BUDGET_S and 20 <= margin < limit
