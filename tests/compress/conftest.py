"""The compression tests run on one torch CPU thread (`one_cpu_thread` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_cpu_thread(one_cpu_thread):
    yield
