"""`PageLoader.load_cores`: a compressed adapter's host cores land in its blocks of every layer's
pool, page for page, other blocks untouched; on the GPU straight from pinned memory on the copy
stream, with no device buffer allocated per load."""

from __future__ import annotations

import pytest
import torch

from slora_plugin.worker.page_loader import PageLoader

FILL = -7.0


def expected(pools_before: list[torch.Tensor], loads: list[tuple[torch.Tensor, list[int]]],
             page_elems: int) -> list[torch.Tensor]:
    """The pools after `loads` (cores, block ids), applied in order on the host."""
    out = [p.clone() for p in pools_before]
    for cores, blocks in loads:
        for layer, pool in enumerate(out):
            for page, block in enumerate(blocks):
                pool[block * page_elems:(block + 1) * page_elems] = cores[layer, page]
    return out


def test_cores_land_in_their_blocks_only() -> None:
    g = torch.Generator().manual_seed(0)
    layers, page_elems, blocks_total = 3, 8, 6
    pools = [torch.full((blocks_total * page_elems,), FILL) for _ in range(layers)]
    before = [p.clone() for p in pools]
    cores = torch.randn(layers, 2, page_elems, generator=g)
    loader = PageLoader("cpu", staging_bytes=0)
    loader.load_cores(pools, cores, [5, 1])
    for got, want in zip(pools, expected(before, [(cores, [5, 1])], page_elems)):
        assert torch.equal(got, want)
    assert bool((pools[0][:page_elems] == FILL).all())  # block 0 was not named


def test_cores_of_another_shape_are_refused() -> None:
    loader = PageLoader("cpu", staging_bytes=0)
    pools = [torch.zeros(32) for _ in range(2)]
    with pytest.raises(ValueError, match="2 pools"):
        loader.load_cores(pools, torch.zeros(3, 1, 8), [0])
    with pytest.raises(ValueError, match="needs 1 pages but got 2 blocks"):
        loader.load_cores(pools, torch.zeros(2, 1, 8), [0, 1])


@pytest.mark.gpu
def test_cores_copy_from_pinned_memory_on_the_copy_stream_without_device_buffers() -> None:
    g = torch.Generator().manual_seed(1)
    layers, page_elems, blocks_total = 4, 4096, 64
    for dtype in (torch.float16, torch.bfloat16):
        pools = [torch.full((blocks_total * page_elems,), FILL, dtype=dtype, device="cuda")
                 for _ in range(layers)]
        before = [p.cpu() for p in pools]
        loader = PageLoader("cuda", staging_bytes=1 << 20)
        copy = torch.cuda.Stream()
        loads = []
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
        for rep in range(3):  # back-to-back loads of different adapters into reused blocks
            for pages in (1, 2, 3):
                cores = torch.randn(layers, pages, page_elems, generator=g).to(dtype).pin_memory()
                blocks = torch.randperm(blocks_total, generator=g)[:pages].tolist()
                with torch.cuda.stream(copy):
                    loader.load_cores(pools, cores, blocks)
                loads.append((cores, blocks))
        assert torch.cuda.max_memory_allocated() == allocated  # not even for a moment
        copy.synchronize()
        for got, want in zip(pools, expected(before, loads, page_elems)):
            assert torch.equal(got.cpu(), want)
