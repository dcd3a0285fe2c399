"""Requests whose adapter cannot be served: which ones, and why.

An adapter is unusable when its spec fails (`pages_of` raises: missing files, a malformed
config, a module without LoRA layers...), when it needs more pages than the whole KV cache, or
when its load failed in the worker after admission (`worker_link.LoadFailures`). The vLLM glue
(`pool/scheduler.py`) finishes those requests with FINISHED_ERROR and the reason, and touches no
other request: one broken adapter must not stop the engine.

No vLLM import: requests and LoRA requests are read by attribute (`request_id`,
`lora_request`, `is_finished()`; `lora_int_id`, `lora_name`, `lora_path`), so plain objects
stand in for them in tests.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from slora_plugin.pool.page_pool import AdapterNeed, PagePool

#: lora_request -> (number of KV pages the adapter occupies, content id). Raises for an adapter
#: that cannot be used (the message should name the adapter, the file and the reason).
PagesOf = Callable[[Any], tuple[int, str]]


class AdapterUnusable(Exception):
    """The request's adapter cannot be served; the message says which adapter and why."""


def describe_failure(lora_request: Any, error: BaseException) -> str:
    text = str(error)
    if getattr(error, "adapter", None) is not None:  # AdapterError names itself already
        return text
    return f"adapter {lora_request.lora_name!r} ({lora_request.lora_path}): {text}"


def adapter_need(lora_request: Any, pages_of: PagesOf, usable_blocks: int) -> AdapterNeed | None:
    """What admitting a request with `lora_request` takes besides KV (None: no adapter), with a
    KV cache of `usable_blocks` blocks; raises AdapterUnusable."""
    lr = lora_request
    if lr is None:
        return None
    try:
        num_pages, content_id = pages_of(lr)
    except Exception as e:  # noqa: BLE001 - one broken adapter must not stop the engine
        raise AdapterUnusable(describe_failure(lr, e)) from e
    if num_pages > usable_blocks:
        raise AdapterUnusable(
            f"adapter {lr.lora_name!r} ({lr.lora_path}): needs {num_pages} KV pages but "
            f"the whole KV cache has {usable_blocks}; raise gpu_memory_utilization "
            f"or serve it with a smaller rank")
    return AdapterNeed(lr.lora_int_id, lr.lora_name, lr.lora_path, num_pages, content_id)


def mark_failed_loads(failed: Mapping[int, str], pool: PagePool, requests: Iterable[Any],
                      mark_unusable: Callable[[str, str], None]) -> None:
    """Adapters whose load failed in the worker after admission (`failed`: lora id -> reason):
    the pool marks them broken, and every unfinished request using one (running or not) is
    marked unusable with its reason."""
    for lora_id in failed:
        pool.mark_broken(lora_id)
    for request in requests:
        lr = request.lora_request
        if lr is not None and lr.lora_int_id in failed and not request.is_finished():
            mark_unusable(request.request_id, failed[lr.lora_int_id])
