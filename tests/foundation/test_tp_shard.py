"""`slora_plugin.tp_shard`: S-LoRA's tensor-parallel adapter shards against the unsharded math.

The forward is checked in real `torch.distributed` gloo groups (2 and 4 processes, fp64) against
y = x W_baseᵀ + s (x Aᵀ) Bᵀ for every vLLM layer kind (qkv with GQA, KV heads replicated or not;
o; gate_up; down), both ways of holding a row layer's B, adapter ranks that divide the TP size and
ranks that do not, several adapters of different ranks (and tokens without one) in one batch.
The collectives each layer issues are counted and sized.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from slora_plugin.layout import (
    MODULES, PACKED_MODULES, LayoutError, ModelDims, pack_layer, plan_layout, unpack_layer)
from slora_plugin.tp_shard import (
    COLUMN_MODULES, ModuleShard, ShardDims, pages_per_rank, shard_adapter, shard_layout,
    shard_report, sharded_lora_forward)

GQA = ModelDims(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, num_hidden_layers=1)
MQA = ModelDims(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                intermediate_size=48, num_hidden_layers=1)
WIDE = ModelDims(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                 intermediate_size=96, num_hidden_layers=1)
#: Module ranks of the adapters of one batch: divisible by 2 and 4, not divisible, below the TP
#: size, rank_pattern-like mixes, modules absent.
ADAPTER_RANKS: tuple[dict[str, int], ...] = (
    {m: 4 for m in MODULES},
    {"q_proj": 3, "k_proj": 5, "v_proj": 1, "o_proj": 7, "gate_proj": 2, "up_proj": 6,
     "down_proj": 3},
    {"q_proj": 8, "v_proj": 8},
    {"o_proj": 1, "gate_proj": 3, "down_proj": 5},
)
MAX_RANK = 8
TOKENS = 13


def make_weights(dims: ModelDims, seed: int) -> tuple[dict, list[dict], list[float]]:
    """The base weights and the adapters' (A, B), identical in every process (seeded)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    base = {m: rand(dims.module_io(m)[1], dims.module_io(m)[0]) for m in MODULES}
    adapters = [{m: (rand(r, dims.module_io(m)[0]), rand(dims.module_io(m)[1], r))
                 for m, r in ranks.items()} for ranks in ADAPTER_RANKS]
    scales = [0.5 + k for k in range(len(adapters))]
    return base, adapters, scales


def reference(layer: str, x: torch.Tensor, base: dict, adapters: list[dict], scales: list[float],
              token_adapter: torch.Tensor) -> torch.Tensor:
    """The unsharded layer: its slices' y = x Wᵀ + s (x Aᵀ) Bᵀ side by side."""
    outs = []
    for m in PACKED_MODULES[layer]:
        y = x @ base[m].t()
        for k, ad in enumerate(adapters):
            if m in ad:
                rows = token_adapter == k
                a, b = ad[m]
                y[rows] += scales[k] * (x[rows] @ a.t()) @ b.t()
        outs.append(y)
    return torch.cat(outs, dim=1)


def rank_columns(layer: str, sd: ShardDims, tp_rank: int) -> list[int]:
    """The columns of the unsharded column layer's output that rank `tp_rank` produces."""
    cols, offset = [], 0
    for m in PACKED_MODULES[layer]:
        start, stop = sd.out_range(m, tp_rank)
        cols.extend(range(offset + start, offset + stop))
        offset += sd.full_io(m)[1]
    return cols


def base_shard(layer: str, base: dict, sd: ShardDims, tp_rank: int) -> torch.Tensor:
    """vLLM's partition of the base weight of `layer` on rank `tp_rank`."""
    modules = PACKED_MODULES[layer]
    if modules[0] in COLUMN_MODULES:
        return torch.cat([base[m][slice(*sd.out_range(m, tp_rank))] for m in modules])
    (m,) = modules
    return base[m][:, slice(*sd.in_range(m, tp_rank))]


class CountingGloo:
    """`tp_shard.Collectives` over the default gloo group, recording each call and its size."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: list[tuple[str, int]] = []

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(("all_gather", tensor.numel()))
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor.contiguous())
        return torch.stack(out)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append(("all_reduce", tensor.numel()))
        out = tensor.clone()
        dist.all_reduce(out)
        return out


def check_rank(tp_rank: int, world: int, init_file: str, dims_list: list[ModelDims]) -> None:
    """One process of the group: every layer kind, both row modes, against the reference."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=tp_rank,
                            world_size=world)
    try:
        for case, dims in enumerate(dims_list):
            base, adapters, scales = make_weights(dims, seed=case)
            g = torch.Generator().manual_seed(100 + case)
            token_adapter = torch.randint(-1, len(adapters), (TOKENS,), generator=g)
            for row_b in ("sharded", "replicated"):
                sd = ShardDims.of(dims, world, row_b)
                shards = [shard_adapter(ad, dims, world, tp_rank, row_b=row_b) for ad in adapters]
                for layer, modules in PACKED_MODULES.items():
                    fin = sd.full_io(modules[0])[0]
                    x = torch.randn(TOKENS, fin, generator=g, dtype=torch.float64)
                    want = reference(layer, x, base, adapters, scales, token_adapter)
                    comm = CountingGloo(world)
                    column = modules[0] in COLUMN_MODULES
                    x_rank = x if column else x[:, slice(*sd.in_range(modules[0], tp_rank))]
                    got = sharded_lora_forward(layer, x_rank, base_shard(layer, base, sd, tp_rank),
                                               shards, scales, token_adapter, sd, tp_rank,
                                               MAX_RANK, comm)
                    if column:
                        want = want[:, rank_columns(layer, sd, tp_rank)]
                        calls = [("all_gather", len(modules) * TOKENS * -(-MAX_RANK // world))]
                    else:
                        calls = [("all_reduce", TOKENS * MAX_RANK)] if row_b == "sharded" else []
                        calls.append(("all_reduce", TOKENS * want.shape[1]))
                    where = f"{dims} {row_b} {layer} rank {tp_rank}/{world}"
                    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=where)
                    assert comm.calls == calls, (where, comm.calls)
    finally:
        dist.destroy_process_group()


def run_group(world: int, dims_list: list[ModelDims], tmp_path) -> float:
    """Run `check_rank` in `world` forked processes; a failing rank fails the test."""
    start = time.monotonic()
    tmp.start_processes(check_rank, args=(world, str(tmp_path / "gloo-init"), dims_list),
                        nprocs=world, join=True, start_method="spawn")
    return time.monotonic() - start


def test_two_ranks_match_the_unsharded_layers(tmp_path):
    run_group(2, [GQA, MQA], tmp_path)  # KV heads split (2 >= 2) and replicated (1 < 2)


@pytest.mark.slow
def test_four_ranks_match_the_unsharded_layers(tmp_path):
    run_group(4, [WIDE], tmp_path)  # 2 KV heads on 4 ranks: each head on 2 ranks


# --- the partition and the pages, in one process ---------------------------------------------

@pytest.mark.parametrize("heads,kv,t", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 8, 4), (8, 2, 8)])
def test_kv_heads_are_split_or_replicated_like_vllm(heads, kv, t):
    """vLLM's `QKVParallelLinear`: kv_loc = kv / t heads, or 1 head replicated on t / kv ranks
    (rank i holds head i // replicas); q always split."""
    dims = ShardDims.of(ModelDims(8 * heads, heads, kv, 8, 16 * t, 1), t)
    replicas = max(t // kv, 1)
    assert dims.kv_replicas == replicas
    kv_loc = max(kv // t, 1)
    for i in range(t):
        shard = i // replicas
        assert dims.out_range("k_proj", i) == (shard * kv_loc * 8, (shard + 1) * kv_loc * 8)
        assert dims.out_range("v_proj", i) == dims.out_range("k_proj", i)
        assert dims.out_range("q_proj", i) == (i * heads * 8 // t, (i + 1) * heads * 8 // t)
    covered = sorted({dims.out_range("k_proj", i) for i in range(t)})
    assert covered[0][0] == 0 and covered[-1][1] == kv * 8
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


@pytest.mark.parametrize("dims,t", [(ModelDims(48, 6, 6, 8, 64, 1), 4),   # heads % t
                                    (ModelDims(48, 6, 3, 8, 64, 1), 2),   # kv, t: neither divides
                                    (ModelDims(64, 8, 8, 8, 50, 1), 4)])  # intermediate % t
def test_partitions_vllm_refuses_are_refused(dims, t):
    with pytest.raises(LayoutError, match="tensor-parallel size|neither divides"):
        ShardDims.of(dims, t)


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("row_b", ["sharded", "replicated"])
def test_the_shards_hold_the_adapter_once_plus_padding(t, row_b):
    """Column: A's rank rows split (zero padded), B's output rows split; row: A's input
    columns split, B's output rows split or whole."""
    dims = WIDE
    sd = ShardDims.of(dims, t, row_b)
    _, adapters, _ = make_weights(dims, seed=7)
    for ad in adapters:
        shards = [shard_adapter(ad, dims, t, i, row_b=row_b) for i in range(t)]
        for m, (a, b) in ad.items():
            r = a.shape[0]
            if m in COLUMN_MODULES:
                a_all = torch.cat([s[m].a for s in shards])
                assert torch.equal(a_all[:r], a) and not a_all[r:].any()
                for i, s in enumerate(shards):
                    assert torch.equal(s[m].b[:, :r], b[slice(*sd.out_range(m, i))])
                    assert not s[m].b[:, r:].any()
            else:
                assert torch.equal(torch.cat([s[m].a for s in shards], dim=1), a)
                b_all = [s[m].b for s in shards]
                if row_b == "sharded":
                    assert torch.equal(torch.cat(b_all), b)
                else:
                    assert all(torch.equal(x, b) for x in b_all)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("row_b", ["sharded", "replicated"])
def test_every_rank_packs_into_one_layout(t, row_b):
    """One layout (so one block table) for every rank: each rank's shard packs into it and
    unpacks to itself; the per-rank page counts are equal."""
    dims, page_elems = WIDE, 160
    _, adapters, _ = make_weights(dims, seed=3)
    for ranks, ad in zip(ADAPTER_RANKS, adapters):
        layout = shard_layout(ranks, dims, t, page_elems, row_b=row_b)
        assert len(set(pages_per_rank(ranks, dims, t, page_elems, row_b=row_b))) == 1
        assert pages_per_rank(ranks, dims, t, page_elems, row_b=row_b)[0] == layout.num_pages
        for i in range(t):
            shard = shard_adapter(ad, dims, t, i, row_b=row_b)
            pages = torch.full((layout.num_pages, page_elems), float("nan"), dtype=torch.float64)
            pack_layer(layout, {m: s.page_weights() for m, s in shard.items()}, pages)
            back = unpack_layer(layout, pages)
            for m, s in shard.items():
                again = ModuleShard.from_page_weights(m, s.rank, t, *back[m])
                assert torch.equal(again.a, s.a) and torch.equal(again.b, s.b), (m, i)


def test_one_rank_is_the_unsharded_layout():
    for ranks in ADAPTER_RANKS:
        assert shard_layout(ranks, WIDE, 1, 160) == plan_layout(ranks, WIDE, 160)


@pytest.mark.parametrize("t", [2, 4, 8])
def test_shard_rows_are_no_longer_than_at_one_rank(t):
    """A page size that holds the TP = 1 rows holds every shard's rows."""
    dims = ModelDims(4096, 32, 8, 128, 14336, 32)  # Llama-3-8B
    sd = ShardDims.of(dims, t)
    longest = max(max(dims.module_io(m)) for m in MODULES)
    assert max(max(sd.module_io(m)) for m in MODULES) <= longest


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("row_b", ["sharded", "replicated"])
def test_the_report_accounts_for_every_element(t, row_b):
    """node = unsharded + padding + replicas; no padding or replicas when nothing calls for them."""
    for dims in (WIDE, ModelDims(64, 8, 8, 8, 96, 1)):
        for ranks in ADAPTER_RANKS:
            rep = shard_report(ranks, dims, t, 160, row_b=row_b)
            assert rep.node_elems == rep.unsharded_elems + rep.padding_elems + rep.replicated_elems
            assert rep.page_waste_elems == rep.num_pages * 160 - rep.shard_elems
    even = {m: 8 for m in MODULES}
    rep = shard_report(even, ModelDims(64, 8, 8, 8, 96, 1), t, 160)
    assert rep.padding_elems == rep.replicated_elems == 0
    assert rep.shard_elems * t == rep.unsharded_elems
    odd = shard_report({"q_proj": 3}, ModelDims(64, 8, 8, 8, 96, 1), t, 160)
    r_pad = t * -(-3 // t)
    assert odd.padding_elems == (r_pad - 3) * (64 + 64)


def test_module_imports_only_the_layout_and_torch():
    """The sharding core stays vLLM-free: torch, the standard library and `layout` only."""
    import ast
    import sys

    import slora_plugin.tp_shard as mod

    tree = ast.parse(open(mod.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = {"torch", "slora_plugin.layout", "__future__"}
    assert {n for n in names if n not in allowed and n.split(".")[0] not in
            sys.stdlib_module_names} == set()
