"""Paged LoRA kernels vs vLLM 0.26's `lora_shrink`/`lora_expand` on one layer (H100): by default a
fused Llama-2-7B qkv_proj, or with --layer a Llama-3-8B-shaped (GQA) qkv_proj, o_proj, fused
gate_up_proj or down_proj (the shapes of adapters on all seven modules).

    python benchmarks/bench_kernels.py [--layer llama-3-8b:gate_up_proj] [--out-dir benchmarks/results] [--rep-ms 25]

Cases: uniform rank 16 and mixed ranks {8,16,32,64,128} (slot j has rank RANKS[j % 5]); 1, 16, 64
and 256 distinct adapters; decode batches of 1..512 tokens (one token per sequence, adapters
interleaved, distinct <= tokens) and a 4,096-token prefill (one contiguous segment per adapter).
Ours reads the weights out of a shuffled page pool built with the real layout; vLLM gets the same
weights in its stacked slots, zero-padded to the batch's max rank (how vLLM stores them).

Times: `triton.testing.do_bench` median (L2 flushed between runs) of a CUDA-graph replay of one
call, so that Python launch overhead (ours and vLLM's) does not hide the kernel time; eager
timing is used if a capture fails (then `graph` is false in the row). `SegmentMeta.update` runs
once per engine step for all layers, so it is timed apart (`update_us`; `update_eager_us` without a
graph, i.e. with its Python launch overhead) and not in `time_us`.

Bandwidth: bytes that must move at least once over the time: shrink = x + every distinct
adapter's real-rank A rows; expand = y + real-rank B rows; both = all of them (y counted once).
`pct_copy_bw` compares with a device-to-device copy measured in the same run (read + write).
`no_adapter`: both ops at 1 and 256 tokens none of which has an adapter (the per-layer cost of a
step without LoRA requests). Writes benchmarks/results/kernels-<date>.json (another --layer:
kernels-<model>-<layer>-<date>.json) and prints a markdown table. ~3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Callable, Mapping, Sequence

import torch
import triton
import triton.testing
from fixture_loader import load_test_module

from slora_plugin.kernels.expand import paged_lora_expand
from slora_plugin.kernels.lora_linear import paged_lora_linear
from slora_plugin.kernels.metadata import SegmentMeta
from slora_plugin.kernels.shrink import paged_lora_shrink, shrink_buffer
from slora_plugin.kernels.tiling import choose_config
from slora_plugin.layout import MODULE_INDEX, ModelDims

try:  # vLLM is optional: without it only our rows are measured
    from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    VLLM_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no vLLM rows", said in the output
    VLLM_ERROR = f"{type(exc).__name__}: {exc}"

HERE = os.path.dirname(os.path.abspath(__file__))


build_synthetic_pool = load_test_module("kernels/synthetic_pool.py").build_synthetic_pool

LLAMA_2_7B = ModelDims(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       intermediate_size=11008, num_hidden_layers=32)
LLAMA_3_8B = ModelDims(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       intermediate_size=14336, num_hidden_layers=32)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One fused LoRA call of a model: its modules share the input, their outputs sit side by side."""

    name: str
    dims: ModelDims
    modules: tuple[str, ...]

    @property
    def module_ids(self) -> tuple[int, ...]:
        return tuple(MODULE_INDEX[m] for m in self.modules)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.dims.module_io(m)[1] for m in self.modules)

    @property
    def k_in(self) -> int:
        return self.dims.module_io(self.modules[0])[0]

    @property
    def page_elems(self) -> int:
        """vLLM's fp16 page of one layer: block size 16, K and V of every KV head."""
        return 2 * 16 * self.dims.num_key_value_heads * self.dims.head_dim

    def weight_bytes(self, slot_ranks: Sequence[Mapping[str, int]]) -> tuple[int, int]:
        """(A, B) bytes of these adapters' real-rank rows on this layer's modules, fp16."""
        a = sum(2 * r[m] * self.k_in for r in slot_ranks for m in self.modules)
        b = sum(2 * r[m] * w for r in slot_ranks for m, w in zip(self.modules, self.widths))
        return a, b


LAYERS = {layer.name: layer for layer in (
    Layer("llama-2-7b:qkv_proj", LLAMA_2_7B, ("q_proj", "k_proj", "v_proj")),
    Layer("llama-3-8b:qkv_proj", LLAMA_3_8B, ("q_proj", "k_proj", "v_proj")),
    Layer("llama-3-8b:o_proj", LLAMA_3_8B, ("o_proj",)),
    Layer("llama-3-8b:gate_up_proj", LLAMA_3_8B, ("gate_proj", "up_proj")),
    Layer("llama-3-8b:down_proj", LLAMA_3_8B, ("down_proj",)),
)}
DEFAULT_LAYER = "llama-2-7b:qkv_proj"
MAX_RANK = 128                    # the plugin's table width (max_lora_rank)
DTYPE = torch.float16
DEVICE = "cuda"
RANK_SETS = {"uniform": (16,), "mixed": (8, 16, 32, 64, 128)}
DISTINCT = (1, 16, 64, 256)
DECODE_TOKENS = (1, 16, 64, 256, 512)
PREFILL_TOKENS = 4096
MAX_SLOTS = max(DISTINCT)


def copy_gbps(rep_ms: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=rep_ms, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def timed(fn: Callable[[], None], rep_ms: int) -> tuple[float, bool]:
    """(median us, captured in a graph?) of one call of `fn` (already warmed up)."""
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
        run, is_graph = graph.replay, True
    except Exception as exc:  # noqa: BLE001 - fall back to eager timing, recorded in the row
        print(f"  (graph capture failed, timing eagerly: {type(exc).__name__}: {exc})", file=sys.stderr)
        torch.cuda.synchronize()
        run, is_graph = fn, False
    ms = triton.testing.do_bench(run, warmup=5, rep=rep_ms, return_mode="median")
    return ms * 1e3, is_graph


def slot_ranks(layer: Layer, rank_set: tuple[int, ...]) -> list[dict[str, int]]:
    return [{m: rank_set[j % len(rank_set)] for m in layer.modules} for j in range(MAX_SLOTS)]


def token_slots(phase: str, tokens: int, distinct: int) -> torch.Tensor:
    idx = torch.arange(tokens)
    slots = idx % distinct if phase == "decode" else idx * distinct // tokens
    return slots.to(torch.int32).to(DEVICE)


class VllmWeights:
    """vLLM's view of the same adapters: stacked slots zero-padded to `pad` ranks.

    Built once per (rank set, pad) and kept for the whole run: vLLM caches the weights' pointers
    *and strides* by data pointer, so a freed tensor's address reused with another padding would
    hit a stale entry.
    """

    def __init__(self, layer: Layer, weights: list, pad: int) -> None:
        self.a, self.b = [], []
        for m, width in zip(layer.modules, layer.widths):
            a = torch.zeros(MAX_SLOTS, pad, layer.k_in, dtype=DTYPE, device=DEVICE)
            b = torch.zeros(MAX_SLOTS, width, pad, dtype=DTYPE, device=DEVICE)
            for j, slot_weights in enumerate(weights):
                wa, wb = slot_weights[m]
                if wa.shape[0] <= pad:
                    a[j, :wa.shape[0]] = wa
                    b[j, :, :wb.shape[1]] = wb
            self.a.append(a)
            self.b.append(b)


class VllmCase:
    """One batch for vLLM's kernels: its metadata (prepared on the host, untimed) and h buffer."""

    def __init__(self, w: VllmWeights, slots: torch.Tensor, tokens: int) -> None:
        self.w = w
        self.h = torch.empty(len(w.a), tokens, w.a[0].shape[1], dtype=torch.float32, device=DEVICE)
        self.meta = LoRAKernelMeta.make(MAX_SLOTS, tokens, DEVICE)
        self.meta.prepare_tensors(slots)
        self.args = self.meta.meta_args(tokens, True)

    def shrink(self, x: torch.Tensor) -> None:
        lora_shrink(x, self.w.a, self.h, *self.args, 1.0)

    def expand(self, y: torch.Tensor) -> None:
        lora_expand(self.h, self.w.b, y, *self.args, offset_start=0, add_inputs=True)

    def both(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.shrink(x)
        self.expand(y)


def run_case(layer: Layer, rank_name: str, sp, vllm_weights: dict, phase: str, tokens: int, distinct: int,
             copy_bw: float, meta: SegmentMeta, rep_ms: int) -> list[dict]:
    module_ids, widths, k_in = layer.module_ids, layer.widths, layer.k_in
    slots = token_slots(phase, tokens, distinct)
    used_ranks = sorted({int(r) for r in sp.ranks[:distinct, module_ids[0]].tolist()})
    w_bytes = layer.weight_bytes(slot_ranks(layer, RANK_SETS[rank_name])[:distinct])  # real-rank A, B rows
    x = torch.randn(tokens, k_in, dtype=DTYPE, device=DEVICE) / 4
    y = torch.zeros(tokens, sum(widths), dtype=DTYPE, device=DEVICE)
    x_bytes, y_bytes = x.numel() * 2, y.numel() * 2
    op_bytes = {"shrink": x_bytes + w_bytes[0], "expand": y_bytes + w_bytes[1],
                "both": x_bytes + y_bytes + sum(w_bytes)}
    meta.update(slots)
    update_us, update_graph = timed(lambda: meta.update(slots), rep_ms)
    update_eager_us = 1e3 * triton.testing.do_bench(lambda: meta.update(slots), warmup=5, rep=rep_ms,
                                                    return_mode="median")
    config = choose_config(tokens, k_in, MAX_RANK)
    h = shrink_buffer(tokens, len(module_ids), MAX_RANK, config, DEVICE)
    tables = (sp.a_addr, sp.b_addr, sp.ranks, sp.scales)
    ours = {
        "shrink": lambda: paged_lora_shrink(h, x, sp.pool, meta, sp.a_addr, sp.ranks, module_ids, MAX_RANK, config),
        "expand": lambda: paged_lora_expand(y, h, sp.pool, meta, sp.b_addr, sp.ranks, sp.scales, module_ids,
                                            widths, MAX_RANK, config),
        "both": lambda: paged_lora_linear(y, x, sp.pool, meta, *tables, module_ids, widths, MAX_RANK, config),
    }
    vllm, max_diff = None, None
    if VLLM_ERROR is None:
        pad = max(used_ranks)
        key = (rank_name, pad)
        if key not in vllm_weights:
            vllm_weights[key] = VllmWeights(layer, sp.weights, pad)
        vllm = VllmCase(vllm_weights[key], slots, tokens)
        y_v = torch.zeros_like(y)
        vllm.both(x, y_v)
        ours["both"]()
        max_diff = float((y.float() - y_v.float()).abs().max())
        if not max_diff <= 2e-2:
            print(f"  MISMATCH vs vLLM: max |ours - vLLM| = {max_diff}", file=sys.stderr)
    else:
        ours["both"]()
    rows = []
    for op, fn in ours.items():
        t_us, graphed = timed(fn, rep_ms)
        gbps = op_bytes[op] / (t_us * 1e-6) / 1e9
        row = {"op": op, "phase": phase, "rank_set": rank_name, "ranks": used_ranks, "distinct_adapters": distinct,
               "tokens": tokens, "time_us": round(t_us, 2), "gbps": round(gbps, 1),
               "pct_copy_bw": round(100 * gbps / copy_bw, 1), "vllm_time_us": None, "graph": graphed,
               "update_us": round(update_us, 2), "update_graph": update_graph,
               "update_eager_us": round(update_eager_us, 2), "bytes": op_bytes[op],
               "config": config.__dict__}
        if vllm is not None:
            vfn = {"shrink": lambda: vllm.shrink(x), "expand": lambda: vllm.expand(y_v),
                   "both": lambda: vllm.both(x, y_v)}[op]
            v_us, v_graphed = timed(vfn, rep_ms)
            row.update(vllm_time_us=round(v_us, 2), vllm_graph=v_graphed, speedup=round(v_us / t_us, 2),
                       max_abs_diff_vs_vllm=max_diff)
        rows.append(row)
    return rows


#: Tuning data for a follow-up, from the same run: one field of the default config changed at a time
#: (the defaults are kernels/tiling.py's decode_config / prefill_config; kernels/NOTES.md).
SWEEP = {
    ("decode", 256, 256): [{}, {"split_k": 4}, {"block_r": 32}, {"block_n": 128}, {"block_k": 64},
                           {"num_stages": 2}, {"num_stages": 4}, {"num_warps": 8},
                           {"shrink_programs_per_sm": 4, "expand_programs_per_sm": 2}, {"shrink_programs_per_sm": 6},
                           {"shrink_programs_per_sm": 14, "expand_programs_per_sm": 8},
                           {"shrink_programs_per_sm": 64, "expand_programs_per_sm": 64}],
    # small_items 16: v3's split rule 256 // items (64 items: 4; 16: 16); 0: split 2 always (v2)
    ("decode", 64, 64): [{}, {"small_items": 16}, {"block_r": 32}, {"num_stages": 4},
                         {"shrink_programs_per_sm": 14, "expand_programs_per_sm": 8}],
    ("decode", 16, 16): [{}, {"small_items": 16}, {"small_items": 4}],
    ("decode", 1, 1): [{}, {"small_split_k": 8}, {"small_split_k": 32, "small_items": 8}, {"small_items": 0}],
    ("decode", 256, 1): [{}, {"small_items": 16}, {"small_items": 4}],
    ("prefill", PREFILL_TOKENS, 16): [{}, {"block_r": 128}, {"block_r": 32}, {"block_k": 64}, {"num_warps": 8},
                                      {"num_stages": 2}, {"num_stages": 4}, {"block_n": 64}, {"block_kr": 16},
                                      {"expand_programs_per_sm": 3}, {"expand_programs_per_sm": 6}],
    ("prefill", PREFILL_TOKENS, 1): [{}, {"block_r": 32}, {"block_r": 16}],
}


def sweep(layer: Layer, sp, meta: SegmentMeta, rep_ms: int) -> list[dict]:
    """Shrink and expand times of config variants on the mixed-rank pool."""
    module_ids, widths, k_in = layer.module_ids, layer.widths, layer.k_in
    out = []
    for (phase, tokens, distinct), changes in SWEEP.items():
        meta.update(token_slots(phase, tokens, distinct))
        x = torch.randn(tokens, k_in, dtype=DTYPE, device=DEVICE) / 4
        y = torch.zeros(tokens, sum(widths), dtype=DTYPE, device=DEVICE)
        for change in changes:
            config = dataclasses.replace(choose_config(tokens, k_in, MAX_RANK), **change)
            h = shrink_buffer(tokens, len(module_ids), MAX_RANK, config, DEVICE)
            shrink_us, _ = timed(lambda: paged_lora_shrink(h, x, sp.pool, meta, sp.a_addr, sp.ranks, module_ids,
                                                           MAX_RANK, config), rep_ms)
            expand_us, _ = timed(lambda: paged_lora_expand(y, h, sp.pool, meta, sp.b_addr, sp.ranks, sp.scales,
                                                           module_ids, widths, MAX_RANK, config), rep_ms)
            out.append({"phase": phase, "tokens": tokens, "distinct_adapters": distinct, "change": change,
                        "shrink_us": round(shrink_us, 2), "expand_us": round(expand_us, 2)})
            print(f"  sweep {phase} T={tokens} D={distinct} {change or 'default'}: shrink {shrink_us:.1f} us, "
                  f"expand {expand_us:.1f} us", file=sys.stderr)
    return out


def no_adapter_rows(layer: Layer, sp, meta: SegmentMeta, rep_ms: int) -> list[dict]:
    """Both ops on a batch whose tokens have no adapter: what a step without LoRA requests pays
    (the launches of the persistent grids, each program finding no work)."""
    out = []
    for tokens in (1, 256):
        meta.update(torch.full((tokens,), -1, dtype=torch.int32, device=DEVICE))
        x = torch.randn(tokens, layer.k_in, dtype=DTYPE, device=DEVICE)
        y = torch.zeros(tokens, sum(layer.widths), dtype=DTYPE, device=DEVICE)
        t_us, graphed = timed(lambda: paged_lora_linear(y, x, sp.pool, meta, sp.a_addr, sp.b_addr, sp.ranks,
                                                        sp.scales, layer.module_ids, layer.widths, MAX_RANK), rep_ms)
        out.append({"op": "both", "tokens": tokens, "time_us": round(t_us, 2), "graph": graphed})
        print(f"  no adapter T={tokens}: both {t_us:.1f} us", file=sys.stderr)
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| op | phase | ranks | distinct | tokens | ours us | GB/s | % copy BW | vLLM us | speedup |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        v = r["vllm_time_us"]
        ranks = ",".join(map(str, r["ranks"]))
        vllm = "-" if v is None else f"{v:.1f}"
        speedup = "-" if v is None else f"{v / r['time_us']:.2f}x"
        lines.append(f"| {r['op']} | {r['phase']} | {r['rank_set']} {ranks} | {r['distinct_adapters']} | "
                     f"{r['tokens']} | {r['time_us']:.1f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.0f}% | "
                     f"{vllm} | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", default=DEFAULT_LAYER, choices=sorted(LAYERS),
                        help="the model's fused LoRA call to measure")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--rep-ms", type=int, default=25, help="do_bench measuring time per case (ms)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the config sweep (tuning data)")
    args = parser.parse_args()
    layer = LAYERS[args.layer]
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    started = time.time()
    device = torch.cuda.get_device_name()
    print(f"device {device}; vLLM kernels: {'yes' if VLLM_ERROR is None else 'no (' + VLLM_ERROR + ')'}",
          file=sys.stderr)
    copy_bw = copy_gbps(args.rep_ms)
    print(f"device-to-device copy: {copy_bw:.0f} GB/s", file=sys.stderr)
    meta = SegmentMeta(max_tokens=PREFILL_TOKENS, max_slots=MAX_SLOTS, device=DEVICE)
    rows: list[dict] = []
    vllm_weights: dict = {}   # kept alive for the whole run, see VllmWeights
    pools = []
    for rank_name, rank_set in RANK_SETS.items():
        sp = build_synthetic_pool(layer.dims, slot_ranks(layer, rank_set), layer.page_elems, DTYPE, DEVICE, MAX_RANK,
                                  generator=torch.Generator(device=DEVICE).manual_seed(0))
        cases = [("decode", t, d) for d in DISTINCT for t in DECODE_TOKENS if d <= t]
        cases += [("prefill", PREFILL_TOKENS, d) for d in DISTINCT]
        for phase, tokens, distinct in cases:
            rows += run_case(layer, rank_name, sp, vllm_weights, phase, tokens, distinct, copy_bw, meta, args.rep_ms)
            r = rows[-1]
            print(f"[{time.time() - started:5.0f}s] {rank_name} {phase} T={tokens} D={distinct}: both "
                  f"{r['time_us']:.1f} us ({r['pct_copy_bw']:.0f}% copy BW), vLLM {r['vllm_time_us']}", file=sys.stderr)
        pools.append(sp)
    no_adapter = no_adapter_rows(layer, pools[-1], meta, args.rep_ms)
    sweep_rows = [] if args.no_sweep else sweep(layer, pools[-1], meta, args.rep_ms)
    date = datetime.date.today().isoformat()
    result = {"date": date, "device": device, "copy_gbps": round(copy_bw, 1), "dtype": str(DTYPE),
              "layer": layer.name.replace(":", " "), "vllm": VLLM_ERROR or "vllm.lora.ops.triton_ops",
              "seconds": round(time.time() - started, 1), "rows": rows, "no_adapter": no_adapter,
              "sweep": sweep_rows}
    os.makedirs(args.out_dir, exist_ok=True)
    tag = "" if layer.name == DEFAULT_LAYER else layer.name.replace(":", "-") + "-"
    path = os.path.join(args.out_dir, f"kernels-{tag}{date}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(markdown(rows))
    print(f"\nwrote {path} in {result['seconds']} s; copy bandwidth {copy_bw:.0f} GB/s", file=sys.stderr)


if __name__ == "__main__":
    main()
