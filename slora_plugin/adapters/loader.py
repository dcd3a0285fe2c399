"""Read an adapter's safetensors file and write it, packed and scaled, into its pages.

The page layout comes from `slora_plugin.layout.plan_layout` (the one shared definition);
`layout.pack_layer` is its reference writer. This module writes the same bytes much faster
(tests check bit equality against `pack_layer`): rows that the layout placed back to back are
copied as one block, and every element of the destination is written exactly once (rows, the
unused rows of layers with a smaller rank, and the page tails are zeroed, nothing twice), so a
32 MiB adapter costs one read and one write of each byte.

PEFT's scale (`alpha / r`, `alpha / sqrt(r)` with rsLoRA, per layer and module from
`alpha_pattern` / `rank_pattern`) is folded into B in fp32, then cast to the serving dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.peft_format import MODULE_PARENT, WEIGHTS_NAME, tensor_name
from slora_plugin.adapters.spec import AdapterSpec
from slora_plugin.layout import ModelDims, PageLayout

#: PEFT's tensor names: `base_model.model.` prefix optional (some exporters drop it), and an
#: optional adapter-name segment (`lora_A.default.weight`, as in an unfiltered state_dict).
TENSOR_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
    r"(?:\.([A-Za-z0-9_\-]+))?\.weight$")
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

Run = tuple[int, int, int]  # (first row, row count, adapter-local element offset)


@dataclass(frozen=True)
class PackPlan:
    """Contiguous row runs of every module's A and B, and the element ranges no row covers."""

    a_runs: dict[str, tuple[Run, ...]]
    b_runs: dict[str, tuple[Run, ...]]
    gaps: tuple[tuple[int, int], ...]  # (offset, length)


def _runs(rows: tuple[int, ...], length: int) -> tuple[Run, ...]:
    runs: list[list[int]] = []
    for k, off in enumerate(rows):
        if runs and runs[-1][2] + runs[-1][1] * length == off:
            runs[-1][1] += 1
        else:
            runs.append([k, 1, off])
    return tuple((k, n, off) for k, n, off in runs)


def pack_plan(layout: PageLayout) -> PackPlan:
    """The copy plan of a layout (cached: thousands of adapters share a handful of layouts;
    a layout is a function of its page size and its modules' ranks and shapes)."""
    key = (layout.page_elems, tuple((m, p.rank, p.in_features, p.out_features)
                                    for m, p in layout.modules.items()))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_pack_plan(layout)
    return plan


_PLANS: dict[tuple, PackPlan] = {}


def _make_pack_plan(layout: PageLayout) -> PackPlan:
    a, b, covered = {}, {}, []
    for m, pl in layout.modules.items():
        a[m] = _runs(pl.a_rows, pl.in_features)
        b[m] = _runs(pl.b_rows, pl.out_features)
        covered += [(off, n * pl.in_features) for _, n, off in a[m]]
        covered += [(off, n * pl.out_features) for _, n, off in b[m]]
    gaps, pos = [], 0
    for off, n in sorted(covered):
        if off > pos:
            gaps.append((pos, off - pos))
        pos = max(pos, off + n)
    total = layout.num_pages * layout.page_elems
    if pos < total:
        gaps.append((pos, total - pos))
    return PackPlan(a, b, tuple(gaps))


def _write_rows(flat: torch.Tensor, runs: tuple[Run, ...], src: torch.Tensor, length: int,
                scale: float | None = None) -> None:
    """Rows k of `src` (times `scale`, if given) into `flat`; `src` may have fewer rows than the
    layout's rank: the rest are zeroed."""
    have = src.shape[0]
    for k0, n, off in runs:
        dst = flat[off:off + n * length].view(n, length)
        m = max(0, min(n, have - k0))
        if m and scale is None:
            dst[:m].copy_(src[k0:k0 + m])
        elif m:
            # fp16/bf16/fp32 `mul` computes in fp32 (opmath) with the scalar as fp32 and rounds
            # once into `dst`: the same bits as (src.float() * scale).to(dst.dtype).
            torch.mul(src[k0:k0 + m], scale, out=dst[:m])
        if m < n:
            dst[m:].zero_()


def pack_adapter_layer(layout: PageLayout, plan: PackPlan, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       scales: dict[str, float], out: torch.Tensor) -> None:
    """One layer: `weights[m] = (A (r_l, in), B (out, r_l))` with r_l <= the layout's rank (a
    module absent from `weights` gets zero rows). `out` is (num_pages, page_elems)."""
    flat = out.view(-1)
    for off, n in plan.gaps:
        flat[off:off + n].zero_()
    empty = torch.empty(0, 1, dtype=out.dtype)
    for m, pl in layout.modules.items():
        a, b = weights.get(m, (empty, empty))
        _write_rows(flat, plan.a_runs[m], a, pl.in_features)
        if b.dtype not in (out.dtype, torch.float32):
            b = b.to(torch.float32)  # one rounding only: never bf16 -> fp16 through a third type
        _write_rows(flat, plan.b_runs[m], b.t(), pl.out_features, scales.get(m, 1.0))


def tensor_map(keys: list[str], spec: AdapterSpec, dims: ModelDims) -> dict[tuple[int, str, str], str]:
    """(layer, module, "A"/"B") -> key in the file, for exactly the tensors the config implies;
    AdapterError for unknown, duplicate, unexpected or missing tensors."""
    found: dict[tuple[int, str, str], str] = {}
    for key in keys:
        mt = TENSOR_RE.match(key)
        if not mt or mt.group(3) not in MODULE_PARENT or MODULE_PARENT[mt.group(3)] != mt.group(2):
            raise AdapterError(spec.name, WEIGHTS_NAME, f"unexpected tensor {key!r} (not a LoRA A/B "
                                                        f"weight of a supported module)")
        layer, module, which = int(mt.group(1)), mt.group(3), mt.group(4)
        ranks = spec.plan.layer_ranks.get(module)
        if layer >= dims.num_hidden_layers or not ranks or not ranks[layer]:
            raise AdapterError(spec.name, WEIGHTS_NAME, f"extra tensor {key!r}: the config does not "
                                                        f"put LoRA on layer {layer} {module}")
        if (layer, module, which) in found:
            raise AdapterError(spec.name, WEIGHTS_NAME, f"duplicate tensors {found[(layer, module, which)]!r} "
                                                        f"and {key!r}")
        found[(layer, module, which)] = key
    for module, ranks in spec.plan.layer_ranks.items():
        for layer, r in enumerate(ranks):
            for which in "AB":
                if r and (layer, module, which) not in found:
                    raise AdapterError(spec.name, WEIGHTS_NAME,
                                       f"missing tensor {tensor_name(layer, module, which)!r}")
    return found


def read_packed(spec: AdapterSpec, dims: ModelDims, out: torch.Tensor) -> None:
    """Validate the weight file of `spec` and write its pages into `out`,
    a (num_layers, num_pages, page_elems) tensor in the serving dtype."""
    name, layout = spec.name, spec.layout
    plan = pack_plan(layout)
    try:
        with safe_open(spec.weights_file, framework="pt") as f:
            names = tensor_map(list(f.keys()), spec, dims)
            for (layer, module, which), key in names.items():
                _check_slice(f.get_slice(key), key, spec, dims, layer, module, which)
            for layer in range(dims.num_hidden_layers):
                weights, scales = {}, {}
                for module, ranks in spec.plan.layer_ranks.items():
                    if ranks[layer]:
                        weights[module] = (f.get_tensor(names[(layer, module, "A")]),
                                           f.get_tensor(names[(layer, module, "B")]))
                        scales[module] = spec.plan.layer_scales[module][layer]
                pack_adapter_layer(layout, plan, weights, scales, out[layer])
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own errors for corrupt/truncated files
        raise AdapterError(name, WEIGHTS_NAME, f"cannot be read: {type(e).__name__}: {e}") from None
    # One fast pass: a sum is NaN/Inf iff an element is, or it overflowed (then look closely).
    if not math.isfinite(float(out.sum())):
        where = _where_not_finite(out, layout)
        if where:
            raise AdapterError(name, WEIGHTS_NAME, where)


def _check_slice(sl, key: str, spec: AdapterSpec, dims: ModelDims, layer: int, module: str, which: str) -> None:
    dtype = sl.get_dtype()
    if dtype not in DTYPES:
        raise AdapterError(spec.name, WEIGHTS_NAME, f"tensor {key!r} has dtype {dtype}; "
                                                    f"supported: {sorted(DTYPES)}")
    r = spec.plan.layer_ranks[module][layer]
    fin, fout = dims.module_io(module)
    want = [r, fin] if which == "A" else [fout, r]
    if list(sl.get_shape()) != want:
        raise AdapterError(spec.name, WEIGHTS_NAME, f"tensor {key!r} has shape {list(sl.get_shape())}, "
                                                    f"expected {want} (rank {r} from the config)")


def _where_not_finite(out: torch.Tensor, layout: PageLayout) -> str | None:
    """Name the first layer/module with a NaN/Inf (after scaling and the cast to the dtype)."""
    for layer in range(out.shape[0]):
        flat = out[layer].reshape(-1)
        for m, pl in layout.modules.items():
            for which, rows, n in (("A", pl.a_rows, pl.in_features), ("B", pl.b_rows, pl.out_features)):
                for off in rows:
                    if not bool(torch.isfinite(flat[off:off + n]).all()):
                        return (f"layer {layer} {m} lora_{which} has NaN or Inf values (after scaling "
                                f"and conversion to {out.dtype})")
    return None


def check_weights_file(name: str, path: str) -> None:
    """Model-free checks of a weight file (for `adapters check` without --model): readable,
    only PEFT LoRA tensor names, supported dtypes, A/B ranks that agree, finite values."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes: dict[tuple[str, str], dict[str, list[int]]] = {}
            for key in f.keys():
                mt = TENSOR_RE.match(key)
                if not mt or MODULE_PARENT.get(mt.group(3)) != mt.group(2):
                    raise AdapterError(name, WEIGHTS_NAME, f"unexpected tensor {key!r} (not a LoRA A/B "
                                                           f"weight of a supported module)")
                sl = f.get_slice(key)
                if sl.get_dtype() not in DTYPES:
                    raise AdapterError(name, WEIGHTS_NAME, f"tensor {key!r} has dtype {sl.get_dtype()}; "
                                                           f"supported: {sorted(DTYPES)}")
                shapes.setdefault((mt.group(1), mt.group(3)), {})[mt.group(4)] = list(sl.get_shape())
                t = f.get_tensor(key)
                if not math.isfinite(float(t.sum(dtype=torch.float32))) and not bool(torch.isfinite(t).all()):
                    raise AdapterError(name, WEIGHTS_NAME, f"tensor {key!r} has NaN or Inf values")
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(name, WEIGHTS_NAME, f"cannot be read: {type(e).__name__}: {e}") from None
    for (layer, module), ab in shapes.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(name, WEIGHTS_NAME, f"layer {layer} {module}: lora_A and lora_B must both "
                                                   f"be present, found only lora_{''.join(ab)}")
        if len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise AdapterError(name, WEIGHTS_NAME, f"layer {layer} {module}: lora_A {ab['A']} and "
                                                   f"lora_B {ab['B']} do not share a rank")
