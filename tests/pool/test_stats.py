"""pool_stats() and adapter_residency() from plain numbers and objects (pool/stats.py)."""

from __future__ import annotations

from types import SimpleNamespace

from slora_plugin.pool.stats import adapter_residency, pool_stats
from slora_plugin.pool.worker_link import HostLoadWaits


def test_pool_stats_split_the_pages_and_carry_the_counts():
    pool = SimpleNamespace(adapter_pages=5, num_resident=2, num_idle=1, loads=2, evictions=0)
    stats = pool_stats(pool, pages_total=30, pages_free=20, bytes_per_page=4096, preemptions=1,
                       admission_holds=7, admission_forced=2, host_waits=None)
    assert stats == {"pages_total": 30, "pages_free": 20, "pages_kv": 5, "pages_adapters": 5,
                     "adapter_bytes": 5 * 4096, "adapters_resident": 2, "adapters_idle": 1,
                     "adapter_loads": 2, "adapter_evictions": 0, "preemptions": 1,
                     "admission_holds": 7, "admission_forced": 2}
    waits = HostLoadWaits()
    waits.record(0.5)
    with_worker = pool_stats(pool, pages_total=30, pages_free=20, bytes_per_page=4096,
                             preemptions=1, admission_holds=7, admission_forced=2,
                             host_waits=waits)
    assert with_worker == {**stats, "host_load_hits": 0, "host_load_waits": 1,
                           "host_load_wait_s": 0.5}


def test_residency_rows_carry_device_bytes():
    rows = [{"lora_id": 1, "pages": 3}, {"lora_id": 2, "pages": 1}]
    pool = SimpleNamespace(residency=lambda: rows)
    assert adapter_residency(pool, 100) == [{"lora_id": 1, "pages": 3, "bytes": 300},
                                            {"lora_id": 2, "pages": 1, "bytes": 100}]
