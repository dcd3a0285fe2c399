"""A first-fit byte allocator over one preallocated buffer, with coalescing of free blocks.

Pinning memory is slow (cudaHostAlloc maps and locks every page) and pinning each adapter's
tensors separately fragments the pinned pool, so the host cache pins one buffer once and hands
out aligned byte ranges of it. Pure bookkeeping: no tensors here.
"""

from __future__ import annotations

import bisect

#: Every block starts on this boundary (any serving dtype can view it; page-friendly copies).
ALIGN = 4096


class Arena:
    """Offsets into a buffer of `capacity` bytes; not thread-safe (the host cache locks it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGN
        self._free_offsets: list[int] = [0] if self.capacity else []  # sorted
        self._free_sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self._used: dict[int, int] = {}

    @staticmethod
    def rounded(nbytes: int) -> int:
        return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh block of at least `nbytes`, or None if no free block is big enough."""
        size = self.rounded(nbytes)
        for i, off in enumerate(self._free_offsets):
            room = self._free_sizes[off]
            if room >= size:
                del self._free_offsets[i]
                del self._free_sizes[off]
                if room > size:
                    bisect.insort(self._free_offsets, off + size)
                    self._free_sizes[off + size] = room - size
                self._used[off] = size
                return off
        return None

    def free(self, offset: int) -> None:
        """Give a block back, merging it with free neighbours."""
        size = self._used.pop(offset)
        i = bisect.bisect_left(self._free_offsets, offset)
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:  # next is free
            nxt = self._free_offsets.pop(i)
            size += self._free_sizes.pop(nxt)
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == offset:
                self._free_sizes[prev] += size
                return
        self._free_offsets.insert(i, offset)
        self._free_sizes[offset] = size

    def check(self) -> None:
        """Invariants (for tests): blocks are disjoint, inside the buffer, and cover it exactly."""
        blocks = sorted([(o, s, "used") for o, s in self._used.items()] +
                        [(o, s, "free") for o, s in self._free_sizes.items()])
        pos = 0
        for o, s, kind in blocks:
            assert o == pos, f"gap or overlap at {pos}: next block at {o}"
            pos = o + s
        assert pos == self.capacity, f"blocks end at {pos}, capacity {self.capacity}"
        frees = [(o, s) for o, s, k in blocks if k == "free"]
        for (o1, s1), (o2, _) in zip(frees, frees[1:]):
            assert o1 + s1 != o2, f"free blocks at {o1} and {o2} were not coalesced"
