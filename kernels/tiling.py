"""How one call of the paged LoRA op is cut into tiles and launched: the tile config, the measured
decode and prefill configs, the choice between them, and the persistent grids.

The prefill and decode variants are the same kernels with different tiles (`decode_config`,
`prefill_config`, picked from the static token count by `choose_config`): decode uses 16-token
tiles, small rank tiles and a split K so that few segments still fill the GPU; prefill uses
64-token tiles and larger rank tiles for reuse of A/B across tokens. A config depends on the
phase, in_features and max_rank only, and the arguments that differ between layers or token
counts are not specialized (`shrink._SHRINK_DYNAMIC`, `expand._EXPAND_DYNAMIC`), so a model compiles
each kernel once per phase: vLLM's CUDA-graph capture at every batch size triggers no compile after
the first (`lora_linear.launch_plans` exposes the exact launch arguments; tests/kernels count the keys).

Every number below that was chosen by measurement is a named constant; kernels/NOTES.md ("Tuning
constants") gives, for each, its value and the run that chose it. None changes the result beyond
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

#: Decode tiles (`decode_config`; measurements in kernels/NOTES.md, "Tuning constants").
DECODE_BLOCK_M = 16
DECODE_SPLIT_K = 2
DECODE_BLOCK_R = 16
DECODE_BLOCK_K = 128
DECODE_BLOCK_N = 256
DECODE_BLOCK_KR = 16
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
DECODE_SHRINK_PROGRAMS_PER_SM = 5
DECODE_EXPAND_PROGRAMS_PER_SM = 4
DECODE_SMALL_ITEMS = 2
DECODE_SMALL_SPLIT_K = 16
#: Prefill tiles (`prefill_config`); the rank tile is max_rank's power of two, 16 to this.
PREFILL_BLOCK_M = 64
PREFILL_SPLIT_K = 1
PREFILL_MAX_BLOCK_R = 32
PREFILL_BLOCK_K = 128
PREFILL_BLOCK_N = 128
PREFILL_BLOCK_KR = 32
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 3
PREFILL_SHRINK_PROGRAMS_PER_SM = 2
PREFILL_EXPAND_PROGRAMS_PER_SM = 2

#: Token tile sizes for which `SegmentMeta` builds a work list (a config's `block_m` is one of them).
TILE_M: tuple[int, ...] = (DECODE_BLOCK_M, PREFILL_BLOCK_M)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one call; tuning knobs, none of them changes the result beyond rounding."""

    block_m: int      # tokens per work item (one of TILE_M)
    split_k: int      # shrink: K split across programs (partial h summed by expand)
    block_r: int      # shrink: rank rows per program
    block_k: int      # shrink: K elements per loop step
    block_n: int      # expand: output columns per program
    block_kr: int     # expand: rank rows per loop step
    num_warps: int = 4
    num_stages: int = 3  # software-pipeline depth of the K / rank loops (Triton's default)
    # persistent grids: at most this many programs per SM loop over the tasks; one wave at the
    # kernel's occupancy (registers, ptxas -v), so no program waits for a slot behind a whole loop
    shrink_programs_per_sm: int = 4
    expand_programs_per_sm: int = 4
    small_items: int = 0      # with few real work items, split K up to `small_split_k` (see split_for)
    small_split_k: int = 1

    @property
    def max_split(self) -> int:
        """First dimension of the h buffer: the largest split `split_for` can return."""
        return self.small_split_k if self.small_items else self.split_k

    def split_for(self, num_work: int) -> int:
        """The K split of a step with `num_work` real work items, as both kernels compute it on the
        device from `SegmentMeta.work_count` (`_split_for`): few items (a few tokens) have few
        tasks, so each shrink task must be short for the loads to be in flight at once:
        small_split_k * small_items // num_work, clamped to [split_k, small_split_k]."""
        if not self.small_items:
            return self.split_k
        return max(self.split_k, min(self.small_split_k, self.small_split_k * self.small_items // max(num_work, 1)))

    def __post_init__(self) -> None:
        if self.block_m not in TILE_M:
            raise ValueError(f"block_m must be one of {TILE_M}, got {self.block_m}")
        for name in ("block_r", "block_k", "block_n", "block_kr"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.split_k < 1 or (self.small_items and self.small_split_k < self.split_k):
            raise ValueError(f"split_k must be >= 1 and small_split_k >= split_k, got {self.split_k}, "
                             f"{self.small_split_k}")
        if min(self.shrink_programs_per_sm, self.expand_programs_per_sm) < 1 or self.small_items < 0:
            raise ValueError(f"programs per SM must be >= 1 and small_items >= 0, got {self.shrink_programs_per_sm}, "
                             f"{self.expand_programs_per_sm}, {self.small_items}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps must be a power of two <= 16 and num_stages >= 1, got "
                             f"{self.num_warps}, {self.num_stages}")


#: Token counts up to this use the decode variant (vLLM captures CUDA graphs up to 512 tokens).
DECODE_MAX_TOKENS = 512
#: A larger batch (run without CUDA graphs, so its config may follow its content) still takes the
#: decode tiles while its tokens per distinct adapter average at most this: one decode tile.
DECODE_MAX_SEGMENT_TOKENS = DECODE_BLOCK_M


def decode_config(in_features: int, max_rank: int) -> KernelConfig:
    """Few tokens, many adapters (memory-bound on the weights): 16-token tiles, 16-row rank tiles
    (a rank-8 adapter wastes little and a rank-128 one gets 8 tasks per K split), K split in 2 from
    128 work items on.

    H100 sweep (Llama-2-7B qkv, 256 tokens x 256 adapters, kernels/NOTES.md): split 2 instead of 4
    took expand from 197 to 163 us (half the h partials to gather per rank step) for +3% in shrink;
    expand tiles of 256 columns instead of 128 took it to 171 us (twice the B bytes per program, so
    the dependent table loads at a program's start are paid half as often).

    With very few real work items that starves the GPU: one adapter has 2 tasks per rank tile,
    each a 16-step K loop (v2, qkv r16: shrink 21 us at 1 token; v1 with split 16: 9 us). So the
    split grows as the items get fewer: clamp(32 // items, 2, 16) (`split_for`, chosen on the device
    per step: no compile, no host sync): 16 at 1-2 items, 8 at 4, 4 at 8, 2 from 16 on. No more:
    any split but 2 sums its partials in the expand's runtime loop, and the v3 sweep
    (2026-11-23, rule 256 // items) measured split 2 faster at 16 x 16 mixed (54 vs 67 us at
    split 16) and in the expand at 64 x 64 mixed (51.7 vs 67 us at split 4).

    Programs per SM: shrink 93 registers -> 5, expand 124 -> 4 (4 warps, sm_90a, ptxas -v; the
    dynamic task loop took the shrink from 80 registers, 6 per SM).
    """
    return KernelConfig(block_m=DECODE_BLOCK_M, split_k=DECODE_SPLIT_K, block_r=DECODE_BLOCK_R,
                        block_k=DECODE_BLOCK_K, block_n=DECODE_BLOCK_N, block_kr=DECODE_BLOCK_KR,
                        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
                        shrink_programs_per_sm=DECODE_SHRINK_PROGRAMS_PER_SM,
                        expand_programs_per_sm=DECODE_EXPAND_PROGRAMS_PER_SM,
                        small_items=DECODE_SMALL_ITEMS, small_split_k=DECODE_SMALL_SPLIT_K)


def prefill_config(in_features: int, max_rank: int) -> KernelConfig:
    """Long segments: 64-token tiles so each A/B tile is reused across tokens, rank tiles of 32
    (up to max_rank), 128-wide K steps, 4 warps.

    H100 sweep (4,096 tokens, 16 adapters of ranks 8..128): shrink 237 us with rank tiles of 128,
    K steps of 64 and 8 warps; 122 us with rank tiles of 64 (half the zero rows fed to the MMA for
    ranks <= 64, twice the programs), 126 with K steps of 128, 174 with 4 warps; expand 264 -> 229
    us with 4 warps. Second sweep (v2, 2026-11-23): rank tiles of 32 instead of 64 took the shrink
    from 140 to 88 us at 4,096 x 16 mixed and from 59 to 49 us at 4,096 x 1 rank 16 (K steps of
    64: 98; 8 warps: 104). Programs per SM: shrink 231 registers -> 2, expand 218 -> 2 (the
    dynamic task loop took it from 168 registers, 3 per SM: in the v3 sweep 2 per SM cost the
    expand 215 -> 237 us at 4,096 x 16 mixed).
    """
    block_r = min(PREFILL_MAX_BLOCK_R, max(16, triton.next_power_of_2(max_rank)))
    return KernelConfig(block_m=PREFILL_BLOCK_M, split_k=PREFILL_SPLIT_K, block_r=block_r,
                        block_k=PREFILL_BLOCK_K, block_n=PREFILL_BLOCK_N, block_kr=PREFILL_BLOCK_KR,
                        num_warps=PREFILL_NUM_WARPS, num_stages=PREFILL_NUM_STAGES,
                        shrink_programs_per_sm=PREFILL_SHRINK_PROGRAMS_PER_SM,
                        expand_programs_per_sm=PREFILL_EXPAND_PROGRAMS_PER_SM)


def choose_config(num_tokens: int, in_features: int, max_rank: int,
                  adapters: int | None = None) -> KernelConfig:
    """The variant for a (padded, hence static) token count: one per phase and layer shape, never
    a function of the token count within a phase, so that capturing CUDA graphs at every batch
    size compiles each kernel once per phase (see `launch_plans`).

    `adapters`: the distinct adapters among the step's tokens (each one segment once the tokens
    are grouped by slot), when the caller knows them. A batch above DECODE_MAX_TOKENS is a prefill
    unless its tokens per adapter average DECODE_MAX_SEGMENT_TOKENS or fewer: a decode step of
    more sequences than vLLM captures (the GQA 8B model decodes ~600-870 sequences a step on the
    H100) with a few tokens per adapter, for which the prefill tiles (64 tokens, no K split, 2
    programs per SM) would leave most of each tile and of the GPU empty. Both variants are the
    ones compiled anyway: this adds no compile."""
    if num_tokens <= DECODE_MAX_TOKENS or (adapters and num_tokens <= DECODE_MAX_SEGMENT_TOKENS * adapters):
        return decode_config(in_features, max_rank)
    return prefill_config(in_features, max_rank)


#: Programs-per-SM unit of the persistent grids on CPU tensors (the interpreter): small, so the
#: tests' programs loop over several tasks. The interpreter runs programs one after another, so
#: there the first program draws every task and the others only the end of the counter.
CPU_SMS = 2
_SM_COUNTS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (queried once per GPU; `CPU_SMS` for CPU tensors)."""
    if device.type != "cuda":
        return CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _persistent_grid(num_tasks_bound: int, programs_per_sm: int, device: torch.device) -> tuple[int]:
    """At most `programs_per_sm` programs per SM, never more than the static bound on tasks: the
    grid depends on static things only (CUDA graphs); the programs loop over the real tasks."""
    return (max(1, min(num_tasks_bound, programs_per_sm * num_sms(device))),)


def _padded_rank(max_rank: int, config: KernelConfig) -> int:
    return triton.cdiv(max_rank, config.block_r) * config.block_r


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what the launchers run and what `launch_plans` reports, so tests can
    see exactly the arguments Triton specializes on without a GPU."""

    kernel: object
    grid: tuple[int]
    args: dict[str, object]        # runtime arguments, by name
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    dynamic: tuple[str, ...]       # the runtime arguments the kernel does not specialize on

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
