"""Admission by host readiness: which waiting requests vLLM may consider in a step.

Loading an adapter the scheduler admitted is part of the step that runs it: the worker copies
the adapter's pinned host copy to its pages before the forward. When that host copy is not
there yet, the worker reads the adapter from disk first (16-268 MB for Llama-2-7B ranks 8-128 at
4-7 GB/s) and the whole batch waits. S-LoRA admits a request only once its adapter is ready on
the host; so does this module, with the worker's host store as the oracle (`HostReadiness`).

No vLLM import: the vLLM glue (`pool/scheduler.py`, `patches/scheduler.py`) feeds the waiting
requests in the order vLLM considers them and applies the result.
"""

from __future__ import annotations

from typing import Protocol


class HostReadiness(Protocol):
    """The worker's host adapter store as the scheduler sees it (`AdapterStore` is one; tests
    use fakes). `path` is the adapter's `LoRARequest.lora_path`. Both calls must be cheap
    (no file-system access once an adapter is known): they run for waiting requests every step."""

    def ready(self, path: str) -> bool:
        """Whether the worker can load the adapter without waiting for the disk (its pinned
        copy is there, or its load failed and the worker's get raises at once)."""

    def start(self, path: str) -> None:
        """Start reading the adapter into pinned memory now (no-op when ready or loading)."""
