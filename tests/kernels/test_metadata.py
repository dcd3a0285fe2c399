"""`SegmentMeta`, the per-step segment metadata both kernels read: every adapter token lands in
exactly one work item of its slot, within the static bound the grids are sized by."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_plugin.kernels.metadata import SegmentMeta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(st.integers(-1, 6), max_size=70), max_slots=st.integers(1, 6), extra=st.integers(0, 5))
def test_segment_meta_covers_every_adapter_token_once(slots: list[int], max_slots: int, extra: int) -> None:
    """Every token of a slot in [0, max_slots) is in exactly one work item of its slot, for each
    tile size; items are within the static bound, hold <= block_m tokens, and the rest are empty."""
    meta = SegmentMeta(max_tokens=len(slots) + extra + 1, max_slots=max_slots, device=DEVICE)
    meta.update(torch.full((len(slots) + extra,), 3, dtype=torch.int32, device=DEVICE))  # stale state
    meta.update(torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    order = meta.sorted_tokens[:len(slots)].tolist()
    for bm, work in meta.work.items():
        slot_of, start, count = work.tolist()
        bound = meta.work_bound(len(slots), bm)
        real = int(meta.work_count[bm])
        assert real <= bound
        seen = []
        for i, (s, p, n) in enumerate(zip(slot_of, start, count)):
            assert 0 <= n <= bm
            assert (n > 0) == (i < real), f"item {i}: {n} tokens, but work_count = {real}"
            if n:
                seen += [(order[j], s) for j in range(p, p + n)]
        want = sorted((t, s) for t, s in enumerate(slots) if 0 <= s < max_slots)
        assert sorted(seen) == want
