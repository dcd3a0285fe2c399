"""Adapter-pool and preemption counters for the throughput rows.

The plugin's page pool lives in the scheduler, inside vLLM's engine-core process; the runner
drives the engine from the parent process through public API only. Two public channels reach it:

- Preemptions, for every system: vLLM's Prometheus counter `vllm:num_preemptions`, read with
  `LLM.get_metrics()` in the parent (the engine core sends its events with every output).
- Adapter loads/evictions and pages, for the plugin: the scheduler logs `pool_stats()` on logger
  `vllm.slora.pool` (at most every `STATS_LOG_INTERVAL_S`, from `update_from_output`, when log
  stats are on). The runner hands the engine core a logging config (`VLLM_LOGGING_CONFIG_PATH`,
  inherited by the spawned process) that is vLLM's default plus a file handler for that logger,
  and reads the file. The counters are cumulative, so a row is the difference between a line
  written just after its trace and one written just before: `PoolLog.boundary` gets such a line
  by sending tiny no-LoRA requests until the scheduler logs again. Peaks (adapter pages, resident
  adapters) are over the lines written during the trace, i.e. sampled every ~10 s.

Reaching the scheduler in-process instead (VLLM_ENABLE_V1_MULTIPROCESSING=0) would give exact
numbers, but would run the engine differently from the stock and base rows it is compared with.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

POOL_LOGGER = "vllm.slora.pool"
#: Prefix of the scheduler's line: `logger.info("slora page pool: %s", self.pool_stats())`.
POOL_MESSAGE = "slora page pool: "
PREEMPTION_METRIC = "vllm:num_preemptions"
#: Cumulative counts the pool line may lack (the worker's blocking host loads: only when it
#: shares the scheduler's process, as with TP=1; the admission counts: older plugin versions);
#: a row gets their growth over its trace, or None.
OPTIONAL_COUNTS = ("host_load_hits", "host_load_waits", "host_load_wait_s", "admission_holds",
                   "admission_forced")
#: Row keys this module fills (None where unknown: stock/base pools, no log line).
POOL_KEYS = ("adapter_loads", "adapter_evictions", "pages_total", "adapter_pages_peak",
             "adapters_resident_peak", *OPTIONAL_COUNTS)


def logging_config(base: Mapping[str, Any], log_path: str) -> dict[str, Any]:
    """`base` (vLLM's DEFAULT_LOGGING_CONFIG) plus a file handler on POOL_LOGGER; the logger
    still propagates to vLLM's console handler, so the console log is unchanged."""
    cfg = copy.deepcopy(dict(base))
    cfg.setdefault("formatters", {})["slora_pool_file"] = {"format": "%(created).3f %(message)s"}
    cfg.setdefault("handlers", {})["slora_pool_file"] = {
        "class": "logging.FileHandler", "filename": log_path, "formatter": "slora_pool_file",
        "level": "INFO"}
    cfg.setdefault("loggers", {})[POOL_LOGGER] = {
        "handlers": ["slora_pool_file"], "level": "INFO", "propagate": True}
    return cfg


def pool_log_env(log_path: str, config_dir: str) -> dict[str, str] | None:
    """Write the logging config (a file for `log_path`) into `config_dir`; the environment the
    engine needs for it, or None where the caller's environment already decides vLLM's logging
    (then no pool numbers). The config is an internal file the engine reads once at start:
    `config_dir` is the caller's temporary directory, never the results directory."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return None
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    cfg_path = os.path.join(config_dir, "slora-pool-logging.json")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    os.makedirs(config_dir, exist_ok=True)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(logging_config(DEFAULT_LOGGING_CONFIG, os.path.abspath(log_path)), f, indent=1)
    return {"VLLM_LOGGING_CONFIG_PATH": os.path.abspath(cfg_path)}


def parse_pool_lines(text: str) -> list[dict[str, int]]:
    """The pool_stats dicts of the log, in order; other and malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        _, _, msg = line.partition(" ")
        if not msg.startswith(POOL_MESSAGE):
            continue
        try:
            stats = ast.literal_eval(msg[len(POOL_MESSAGE):].strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(stats, dict):
            out.append(stats)
    return out


def pool_fields(before: Mapping[str, int] | None, during: Sequence[Mapping[str, int]],
                after: Mapping[str, int] | None) -> dict[str, Any]:
    """Row fields of one trace from the boundary lines around it and the lines between; every
    field is None when a boundary line is missing (the counters are cumulative)."""
    if before is None or after is None:
        return {**dict.fromkeys(POOL_KEYS), "pool_samples": len(during)}
    seen = [*during, after]
    optional = {key: (round(after[key] - before[key], 6) if key in after and key in before
                      else None) for key in OPTIONAL_COUNTS}
    return {
        "adapter_loads": after["adapter_loads"] - before["adapter_loads"],
        "adapter_evictions": after["adapter_evictions"] - before["adapter_evictions"],
        "pages_total": after["pages_total"],
        "adapter_pages_peak": max(s["pages_adapters"] for s in seen),
        "adapters_resident_peak": max(s["adapters_resident"] for s in seen),
        "pool_samples": len(during),
        "pool_preemptions": after["preemptions"] - before["preemptions"],
        **optional,
    }


class PoolLog:
    """The pool log file the engine core appends to, read from the runner."""

    def __init__(self, path: str, interval_s: float | None = None):
        if interval_s is None:
            from slora_plugin.pool.scheduler import STATS_LOG_INTERVAL_S as interval_s
        self.path = path
        self.interval_s = interval_s
        self._mark = 0
        self.dead = False

    def lines(self) -> list[dict[str, int]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return parse_pool_lines(f.read())
        except FileNotFoundError:
            return []

    def boundary(self, poke: Callable[[], None], poll_s: float = 1.0
                 ) -> tuple[dict[str, int] | None, list[dict[str, int]]]:
        """(a line written after this call, the lines since the previous boundary before it).

        `poke` runs a tiny request to completion: the scheduler logs only from a step, and only
        `interval_s` after its previous line. Gives up (None) after interval_s + 5 s, and from
        then on at once: a plugin that never logs must not cost every trace that long."""
        have = len(self.lines())
        give_up = time.time() + self.interval_s + 5.0
        while not self.dead:
            poke()
            lines = self.lines()
            if len(lines) > have:
                during, self._mark = lines[self._mark:-1], len(lines)
                return lines[-1], during
            if time.time() > give_up:
                self.dead = True
                break
            time.sleep(poll_s)
        lines = self.lines()
        during, self._mark = lines[self._mark:], len(lines)
        return None, during


def preemption_count(llm: Any) -> int | None:
    """vLLM's cumulative preemption counter, or None where metrics are unavailable."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - a missing metric must not lose the row
        return None
    values = [m.value for m in metrics if m.name == PREEMPTION_METRIC and hasattr(m, "value")]
    return int(sum(values)) if values else None
