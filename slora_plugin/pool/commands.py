"""What the scheduler tells the workers each step, riding on vLLM's SchedulerOutput.

Adapter pages are decided in the scheduler process (they are KV blocks); the weights are copied
in the worker process. The scheduler attaches one `StepCommands` to every `SchedulerOutput` it
returns, as the attribute `slora`; the multiprocessing executor pickles the dataclass with it,
the in-process executor passes the same object. Workers apply `evict` before `load`, before
running the step, so a block id freed by an eviction can be reused by a load of the same step.
Warm-up passes send SchedulerOutputs built by vLLM itself: read with `commands_of()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTRIBUTE = "slora"


@dataclass(frozen=True)
class LoadAdapter:
    """Copy adapter `lora_id` (read from `path`) into KV blocks `block_ids`, in page order."""

    lora_id: int
    name: str
    path: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepCommands:
    #: lora ids whose pages were taken back; their page tables must not be used any more.
    evict: tuple[int, ...] = ()
    load: tuple[LoadAdapter, ...] = ()
    #: (name, path) of adapters that queued requests will need: read them into host memory.
    prefetch: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.evict or self.load or self.prefetch)


EMPTY = StepCommands()


def attach(scheduler_output: Any, commands: StepCommands) -> None:
    setattr(scheduler_output, ATTRIBUTE, commands)


def commands_of(scheduler_output: Any) -> StepCommands:
    return getattr(scheduler_output, ATTRIBUTE, None) or EMPTY
