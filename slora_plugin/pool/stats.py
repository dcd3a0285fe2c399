"""What the scheduler's `pool_stats()` and `adapter_residency()` report, from plain numbers.

The vLLM glue (`pool/scheduler.py`) reads the block counts off vLLM's BlockPool and its own
counters and passes them here; `metrics.PoolMetrics` publishes the result, keyed alike.
"""

from __future__ import annotations

from slora_plugin.pool.page_pool import PagePool
from slora_plugin.pool.worker_link import HostLoadWaits


def pool_stats(pool: PagePool, *, pages_total: int, pages_free: int, bytes_per_page: int,
               preemptions: int, admission_holds: int, admission_forced: int,
               host_waits: HostLoadWaits | None) -> dict[str, int | float]:
    """Where the KV blocks are (pages = blocks, `pages_total` without vLLM's null block; bytes =
    device bytes over all layers), and cumulative counts. With the worker's `host_waits` (the
    worker shares this process), also its adapter loads by whether the step waited for the host
    copy: `host_load_hits`, `host_load_waits`, `host_load_wait_s`."""
    adapter_pages = pool.adapter_pages
    stats: dict[str, int | float] = {
        "pages_total": pages_total,
        "pages_free": pages_free,
        "pages_kv": pages_total - pages_free - adapter_pages,
        "pages_adapters": adapter_pages,
        "adapter_bytes": adapter_pages * bytes_per_page,
        "adapters_resident": pool.num_resident,
        "adapters_idle": pool.num_idle,
        "adapter_loads": pool.loads,
        "adapter_evictions": pool.evictions,
        "preemptions": preemptions,
        "admission_holds": admission_holds,
        "admission_forced": admission_forced,
    }
    if host_waits is not None:
        stats.update(host_waits.snapshot())
    return stats


def adapter_residency(pool: PagePool, bytes_per_page: int) -> list[dict]:
    """One entry per resident adapter (name, path, pages, bytes, requests using it)."""
    rows = pool.residency()
    for row in rows:
        row["bytes"] = row["pages"] * bytes_per_page
    return rows
