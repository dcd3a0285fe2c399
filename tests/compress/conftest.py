"""One torch CPU thread for the compression tests: their many small linear-algebra ops ran up to
35x slower with 2 threads on the shared 2-core machine (thread hand-offs, not arithmetic)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
