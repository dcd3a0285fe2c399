"""Tensor parallel adapters: S-LoRA's partition of an adapter beside vLLM's partition of the base.

Nothing here is wired into the engine yet (the plugin refuses `tensor_parallel_size > 1`); this is
the vLLM-free core a multi-GPU session wires in: which slice of each adapter a TP rank holds, how
that slice sits in the rank's own KV pages (`layout.plan_layout`, one layout for every rank, so the
scheduler's one block table serves all ranks), and `sharded_lora_forward`, the plain-torch
reference of one rank's computation that the paged kernels will have to match.

Notation: t ranks, rank i; x (T, in) the tokens, an adapter's module A (r, in), B (out, r),
scale s (folded into B in the pages), y = x Wᵀ + s (x Aᵀ) Bᵀ. vLLM's partition of W (0.26,
`model_executor/layers/linear.py`), Megatron style:

Column-parallel layers (qkv_proj = q|k|v, gate_up_proj = gate|up; `gather_output=False`): rank i
holds the output rows W[O_i] of each slice and produces y[:, O_i] from the full x. q, gate, up:
O_i = [i out/t, (i+1) out/t). k, v with GQA: each rank holds kv_loc = max(kv_heads / t, 1) heads;
when kv_heads < t vLLM *replicates* each KV head on t / kv_heads consecutive ranks (rank i holds
head i // replicas), as `QKVParallelLinear.num_kv_head_replicas` and
`QKVParallelLinearWithLoRA.slice_lora_b` do.

Row-parallel layers (o_proj, down_proj): rank i holds the input columns W[:, I_i] and sees only
its input shard x_i = x[:, I_i]; it computes the partial sum x_i W[:, I_i]ᵀ and vLLM all-reduces
(`RowParallelLinear.forward`: `tensor_model_parallel_all_reduce`) to y = Σ_i x_i W[:, I_i]ᵀ.

S-LoRA (Sheng et al. 2023, arXiv 2311.03285, section 5) shards the adapter alongside:

Column layers. A is split along the rank: rank i holds A_i = A[R_i] (R_i = [i r_loc, (i+1) r_loc),
r_loc = ceil(r / t), A zero-padded to r_pad = t r_loc rows) and B's output rows B[O_i, :] (all
r_pad columns, zero in the padding). Each rank shrinks h_i = x A_iᵀ (T, r_loc); ONE all-gather per
layer (all slices of the fused layer in one buffer) gives every rank h = [h_0 | ... | h_{t-1}] =
x A_padᵀ (T, r_pad), and the rank expands y[:, O_i] += s h B[O_i, :]ᵀ, exactly its output columns.
Exact: the gathered h is the unsharded shrink (zero in the padding, where B is zero too).
Communication: every rank receives (t-1) T slices ceil(R / t) elements (the gather of a fixed
(slices, T, ceil(R / t)) buffer, R = the engine's max LoRA rank), against 2 (t-1)/t T hidden for
each of the base's all-reduces.

Row layers. A is split by input like W: rank i holds A_i = A[:, I_i] and shrinks the partial sum
p_i = x_i A_iᵀ (T, r); Σ_i p_i = x Aᵀ. Two ways to finish, both exact in exact arithmetic:

- `row_b="sharded"` (S-LoRA; vLLM's `RowParallelLinearWithShardedLoRA`): B is split by output rows,
  rank i holds B[H_i, :] (H_i = [i out/t, (i+1) out/t)). An all-reduce of the small p_i (T, r)
  gives every rank h = x Aᵀ, then the rank adds s h B[H_i, :]ᵀ into *its columns* H_i of the base
  partial sum, before vLLM's all-reduce. That all-reduce then sums the base partials and, in each
  column block H_j, exactly one LoRA term (rank j's), so it doubles as the all-gather of the
  expand output: y = x Wᵀ + s (x Aᵀ) Bᵀ with one extra collective, the all-reduce of a (T, R)
  buffer (2 (t-1)/t T R elements per rank in a ring). Adding rank i's *partial* p_i B[H_i]ᵀ without that
  all-reduce would be wrong: column block H_i would get s p_i B[H_i]ᵀ, not s Σ_j p_j B[H_i]ᵀ.
- `row_b="replicated"` (vLLM's default `RowParallelLinearWithLoRA`): every rank holds all of B
  and adds s p_i Bᵀ into its whole partial sum; vLLM's all-reduce sums them to s (Σ_i p_i) Bᵀ by
  linearity. No extra collective, but B (out r elements) is held on every rank and its expand
  FLOPs are not divided by t.

The issue's "the expand adds into the base's partial sum before vLLM's own all-reduce, so no extra
collective" is the second one read literally; with S-LoRA's sharded B (the issue's memory goal)
the expand still adds into the base's partial sum and needs no collective of its own (the base's
all-reduce gathers it), but the shrink needs the all-reduce of T r above. Both are implemented;
which is faster (one all-reduce of T r per row layer vs t copies of B) is a GPU measurement.

Per transformer layer: S-LoRA costs two all-gathers (qkv, gate_up) and two small all-reduces
(o, down) on top of the base's two all-reduces; `row_b="replicated"` drops the two all-reduces.

Pages. A rank's shard of module m is stored as a rank-r' module with rows of lengths (in', out')
(`ShardDims.module_io`, `shard_rank`), the same for every rank, so `plan_layout` gives one layout
and page count for all ranks:
  - column: r' = r_pad, A' = A_i reshaped to (r_pad, in/t) (row c of A_i is rows c t .. c t + t-1
    of A'), B' = B[O_i, :] (out_loc, r_pad); in' = in/t, out' = out_loc;
  - row: r' = r, A' = A_i (r, in/t), B' = B[H_i] (out/t, r) or B (out, r); in' = in/t, out' = out/t
    or out.
Every row is at most as long as at TP = 1, so a page size that holds the TP = 1 rows holds these
(the rank's KV page is t times smaller when kv_heads >= t: check `plan_layout` with the rank's own
page size). With t = 1 the layout is exactly `plan_layout(ranks, dims, page_elems)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

import torch

from slora_plugin.layout import (
    MODULES, PACKED_MODULES, LayoutError, ModelDims, PageLayout, plan_layout)

#: Modules whose base layer vLLM partitions by output (column-parallel) or by input (row-parallel).
COLUMN_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES: tuple[str, ...] = ("o_proj", "down_proj")

RowB = Literal["sharded", "replicated"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShardDims(ModelDims):
    """A model's full dimensions, vLLM's partition of them over `tp_size` ranks, and the page
    geometry of one rank's adapter shard (`module_io`, what `plan_layout` reads).

    The fields are the *full* model's; `tp_size` is the TP size; `row_b` how row layers hold B.
    """

    row_b: RowB = "sharded"

    def __post_init__(self) -> None:
        t = self.tp_size
        if t < 1:
            raise LayoutError(f"tensor-parallel size must be >= 1, got {t}")
        if self.row_b not in ("sharded", "replicated"):
            raise LayoutError(f"row_b must be 'sharded' or 'replicated', got {self.row_b!r}")
        kv = self.num_key_value_heads
        problems = [f"{name} = {n} is not divisible by the tensor-parallel size {t}"
                    for name, n in (("num_attention_heads", self.num_attention_heads),
                                    ("hidden_size", self.hidden_size),
                                    ("intermediate_size", self.intermediate_size)) if n % t]
        if kv % t and t % kv:
            problems.append(f"num_key_value_heads = {kv} and the tensor-parallel size {t}: "
                            "neither divides the other (vLLM refuses it too)")
        if problems:
            raise LayoutError("; ".join(problems))

    @classmethod
    def of(cls, dims: ModelDims, tp_size: int, row_b: RowB = "sharded") -> "ShardDims":
        """The partition of `dims`' full model over `tp_size` ranks (its own `tp_size` ignored)."""
        full = {f.name: getattr(dims, f.name) for f in dataclasses.fields(ModelDims)}
        return cls(**{**full, "tp_size": tp_size}, row_b=row_b)

    @property
    def kv_replicas(self) -> int:
        """Ranks holding each KV head (vLLM's `num_kv_head_replicas`)."""
        return max(self.tp_size // self.num_key_value_heads, 1)

    def full_io(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of the unsharded module."""
        full = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelDims)}
        return ModelDims(**{**full, "tp_size": 1}).module_io(module)

    def out_range(self, module: str, tp_rank: int) -> tuple[int, int]:
        """Output rows [start, stop) of column module `module` that rank `tp_rank` holds."""
        self._check_rank(tp_rank)
        if module not in COLUMN_MODULES:
            raise LayoutError(f"{module} is not column-parallel")
        if module in ("k_proj", "v_proj"):
            width = max(self.num_key_value_heads // self.tp_size, 1) * self.head_dim
            shard = tp_rank // self.kv_replicas
        else:
            width, shard = self.full_io(module)[1] // self.tp_size, tp_rank
        return shard * width, (shard + 1) * width

    def in_range(self, module: str, tp_rank: int) -> tuple[int, int]:
        """Input columns [start, stop) of row module `module` that rank `tp_rank` holds (and
        sees of the layer's input)."""
        self._check_rank(tp_rank)
        if module not in ROW_MODULES:
            raise LayoutError(f"{module} is not row-parallel")
        width = self.full_io(module)[0] // self.tp_size
        return tp_rank * width, (tp_rank + 1) * width

    def b_range(self, module: str, tp_rank: int) -> tuple[int, int]:
        """Rows [start, stop) of the module's B that rank `tp_rank` holds."""
        if module in COLUMN_MODULES:
            return self.out_range(module, tp_rank)
        self._check_rank(tp_rank)
        out = self.full_io(module)[1]
        if self.row_b == "replicated":
            return 0, out
        width = out // self.tp_size
        return tp_rank * width, (tp_rank + 1) * width

    def module_io(self, module: str) -> tuple[int, int]:
        """(A row length, B row length) of a rank's shard in its pages (see the module docstring):
        what `plan_layout` lays out, with `shard_rank` rows each."""
        fin = self.full_io(module)[0]
        start, stop = self.b_range(module, 0)
        return fin // self.tp_size, stop - start

    def _check_rank(self, tp_rank: int) -> None:
        if not 0 <= tp_rank < self.tp_size:
            raise LayoutError(f"tp_rank {tp_rank} outside [0, {self.tp_size})")


def shard_rank(module: str, rank: int, tp_size: int) -> int:
    """The rows a rank's shard of a rank-`rank` module takes in its pages (`shard_ranks`)."""
    if module in COLUMN_MODULES:
        return tp_size * _ceil_div(rank, tp_size)
    if module in ROW_MODULES:
        return rank
    raise LayoutError(f"unknown module {module!r}; supported: {list(MODULES)}")


def shard_ranks(ranks: Mapping[str, int], tp_size: int) -> dict[str, int]:
    """`plan_layout`'s ranks for a rank's shard of an adapter with module ranks `ranks`."""
    return {m: shard_rank(m, int(r), tp_size) for m, r in ranks.items() if int(r) > 0}


@dataclass(frozen=True)
class ModuleShard:
    """One rank's share of one module of one adapter (one layer), in its mathematical form.

    Column module: `a` (r_loc, in) = rows [i r_loc, (i+1) r_loc) of A zero-padded to t r_loc
    rows, `b` (out_loc, r_pad) = B's output rows `out_range`, zero columns past r.
    Row module: `a` (r, in/t) = A's input columns `in_range`, `b` = B's rows `b_range` (all r).
    """

    module: str
    rank: int
    tp_size: int
    a: torch.Tensor
    b: torch.Tensor

    @property
    def column(self) -> bool:
        return self.module in COLUMN_MODULES

    def page_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') as `layout.pack_layer` takes them for the shard's layout (`shard_layout`)."""
        if self.column:
            r_pad = self.tp_size * self.a.shape[0]
            return self.a.reshape(r_pad, self.a.shape[1] // self.tp_size), self.b
        return self.a, self.b

    @classmethod
    def from_page_weights(cls, module: str, rank: int, tp_size: int,
                          a_page: torch.Tensor, b_page: torch.Tensor) -> "ModuleShard":
        """The inverse of `page_weights` (e.g. on `layout.unpack_layer`'s output)."""
        if module in COLUMN_MODULES:
            r_loc = a_page.shape[0] // tp_size
            return cls(module, rank, tp_size, a_page.reshape(r_loc, a_page.shape[1] * tp_size), b_page)
        return cls(module, rank, tp_size, a_page, b_page)


def shard_module(module: str, a: torch.Tensor, b: torch.Tensor, dims: ShardDims,
                 tp_rank: int) -> ModuleShard:
    """Rank `tp_rank`'s share of one module: `a` (r, in) and `b` (out, r) as in PEFT."""
    fin, fout = dims.full_io(module)
    r = a.shape[0]
    if tuple(a.shape) != (r, fin) or tuple(b.shape) != (fout, r):
        raise ValueError(f"{module}: expected A (r, {fin}) and B ({fout}, r), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    b0, b1 = dims.b_range(module, tp_rank)
    t = dims.tp_size
    if module in COLUMN_MODULES:
        r_loc = _ceil_div(r, t)
        a_pad = a.new_zeros(t * r_loc, fin)
        a_pad[:r] = a
        b_pad = b.new_zeros(b1 - b0, t * r_loc)
        b_pad[:, :r] = b[b0:b1]
        a_shard = a_pad[tp_rank * r_loc:(tp_rank + 1) * r_loc]
        return ModuleShard(module, r, t, a_shard.contiguous(), b_pad)
    i0, i1 = dims.in_range(module, tp_rank)
    return ModuleShard(module, r, t, a[:, i0:i1].contiguous(), b[b0:b1].contiguous())


def shard_adapter(weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dims: ModelDims,
                  tp_size: int, tp_rank: int, *, row_b: RowB = "sharded") -> dict[str, ModuleShard]:
    """Rank `tp_rank`'s shard of one layer of an adapter: `weights[m] = (A (r, in), B (out, r))`
    as in PEFT, `dims` the full model's (its `tp_size` is ignored). Modules of rank 0 are left out.

    The host store calls this once per rank on the one host copy it read (no rank reads the
    file again); each rank packs its shard with `shard_layout`'s layout.
    """
    sd = ShardDims.of(dims, tp_size, row_b)
    sd._check_rank(tp_rank)
    return {m: shard_module(m, a, b, sd, tp_rank) for m, (a, b) in weights.items() if a.shape[0] > 0}


def shard_layout(ranks: Mapping[str, int], dims: ModelDims, tp_size: int, page_elems: int, *,
                 row_b: RowB = "sharded") -> PageLayout:
    """The layout of a rank's shard in the rank's pages of `page_elems` elements: the same for
    every rank (the shard's page geometry does not depend on the rank), so the scheduler's one
    block table holds for all of them."""
    return plan_layout(shard_ranks(ranks, tp_size), ShardDims.of(dims, tp_size, row_b), page_elems)


def pages_per_rank(ranks: Mapping[str, int], dims: ModelDims, tp_size: int, page_elems: int, *,
                   row_b: RowB = "sharded") -> tuple[int, ...]:
    """Pages each rank's shard takes (all equal: see `shard_layout`). The scheduler allocates
    `max(...)` pages on every rank, so a future geometry that differed per rank would pad the
    smaller shards instead of needing per-rank block tables."""
    return tuple(shard_layout(ranks, dims, tp_size, page_elems, row_b=row_b).num_pages
                 for _ in range(tp_size))


@dataclass(frozen=True)
class ShardReport:
    """Where a node's adapter bytes go (elements, one layer; every layer is the same).

    `node_elems = unsharded_elems + padding_elems + replicated_elems`: the t shards together hold
    the adapter once, the zero rows that pad a column module's rank to t r_loc, and the copies of
    KV-head replicas (kv_heads < t) and of a replicated row B."""

    tp_size: int
    num_pages: int           # per rank (equal on every rank)
    unsharded_elems: int     # the adapter at TP = 1
    shard_elems: int         # per rank: what its pages hold, padding included
    padding_elems: int       # node total: zero rows from rank padding
    replicated_elems: int    # node total: copies beyond one
    page_waste_elems: int    # per rank: page space past the rows

    @property
    def node_elems(self) -> int:
        return self.tp_size * self.shard_elems


def shard_report(ranks: Mapping[str, int], dims: ModelDims, tp_size: int, page_elems: int, *,
                 row_b: RowB = "sharded") -> ShardReport:
    """The waste of sharding an adapter with module ranks `ranks` over `tp_size` ranks."""
    sd = ShardDims.of(dims, tp_size, row_b)
    layout = shard_layout(ranks, dims, tp_size, page_elems, row_b=row_b)
    t = tp_size
    unsharded = padding = replicated = 0
    for m, r in ranks.items():
        r = int(r)
        if r <= 0:
            continue
        fin, fout = sd.full_io(m)
        unsharded += r * (fin + fout)
        b0, b1 = sd.b_range(m, 0)
        held_b_rows = t * (b1 - b0)  # B rows over the node, copies included
        if m in COLUMN_MODULES:
            r_pad = shard_rank(m, r, t)
            padding += (r_pad - r) * (fin + held_b_rows)
        replicated += (held_b_rows - fout) * r
    return ShardReport(t, layout.num_pages, unsharded, layout.used_elems, padding, replicated,
                       layout.wasted_elems)


class Collectives(Protocol):
    """The two collectives of the TP group (`torch.distributed`, NCCL or gloo, behind them)."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, stacked in rank order: (t, *tensor.shape)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (a new tensor; the input is left alone)."""


def sharded_lora_forward(layer: str, x: torch.Tensor, base_weight: torch.Tensor,
                         adapters: Sequence[Mapping[str, ModuleShard]], scales: Sequence[float],
                         token_adapter: torch.Tensor, dims: ShardDims, tp_rank: int, max_rank: int,
                         comm: Collectives) -> torch.Tensor:
    """One rank's forward of vLLM layer `layer` (`layout.PACKED_MODULES`) with LoRA, in torch.

    `x`: column layer, all of the layer's input (T, in); row layer, the rank's input shard
    (T, in/t). `base_weight`: the rank's W shard (its slices' rows concatenated for a column
    layer, `dims.in_range`'s columns for a row layer). `adapters[k]`: adapter k's shards on this
    rank (`shard_adapter`), `scales[k]` its scale; `token_adapter` (T,) int: each token's adapter,
    -1 for none. `max_rank`: the engine's largest LoRA rank; the collective buffers are
    (slices, T, ceil(max_rank / t)) and (T, max_rank) whatever the batch, as the kernels' fixed
    buffers will be. Returns the rank's output: a column layer's columns of this rank
    (T, sum of out_loc), a row layer's full output (T, out) after the base all-reduce.

    The shrink outputs are computed in x's dtype (the kernels use fp32 partials).
    """
    modules = PACKED_MODULES[layer]
    t = dims.tp_size
    if len(adapters) != len(scales):
        raise ValueError("one scale per adapter")
    too_big = sorted({s.rank for shards in adapters for s in shards.values() if s.rank > max_rank})
    if too_big:
        raise ValueError(f"adapter ranks {too_big} are above max_rank {max_rank}")
    y = x @ base_weight.t()
    if modules[0] in COLUMN_MODULES:
        r_loc_max = _ceil_div(max_rank, t)
        h = x.new_zeros(len(modules), x.shape[0], r_loc_max)
        for k, shards in enumerate(adapters):
            rows = token_adapter == k
            for s, m in enumerate(modules):
                if m in shards:
                    a = shards[m].a
                    h[s, rows, :a.shape[0]] = x[rows] @ a.t()
        gathered = comm.all_gather(h)  # (t, slices, T, r_loc_max): the layer's one collective
        offset = 0
        for s, m in enumerate(modules):
            start, stop = dims.out_range(m, tp_rank)
            for k, shards in enumerate(adapters):
                if m not in shards:
                    continue
                rows = token_adapter == k
                b = shards[m].b  # (out_loc, t r_loc)
                r_loc = b.shape[1] // t
                # (t, Tk, r_loc) -> (Tk, t r_loc): rank j's block of the padded rank at j r_loc
                hk = gathered[:, s, rows, :r_loc].permute(1, 0, 2).reshape(-1, t * r_loc)
                y[rows, offset:offset + stop - start] += scales[k] * (hk @ b.t())
            offset += stop - start
        return y
    (m,) = modules
    p = x.new_zeros(x.shape[0], max_rank)
    for k, shards in enumerate(adapters):
        if m in shards:
            rows = token_adapter == k
            p[rows, :shards[m].rank] = x[rows] @ shards[m].a.t()
    if dims.row_b == "sharded":
        p = comm.all_reduce(p)  # the small extra collective: every rank gets x Aᵀ
    start, stop = dims.b_range(m, tp_rank)
    for k, shards in enumerate(adapters):
        if m in shards:
            rows = token_adapter == k
            sh = shards[m]
            y[rows, start:stop] += scales[k] * (p[rows, :sh.rank] @ sh.b.t())
    return comm.all_reduce(y)  # vLLM's own all-reduce of the row-parallel base
