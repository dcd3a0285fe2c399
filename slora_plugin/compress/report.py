"""The compression report: how far each compressed adapter is from its original, and the bytes.

Why both per adapter and per module: a mean hides the one adapter (or the one module, say
down_proj) the shared bases fit badly, and that adapter's users see its task quality drop. The
relative error of an (adapter, module) is over all its layers, ‖stacked residuals‖_F /
‖stacked ΔW‖_F; "all" is the same over every module. Summary statistics (`rel_error_mean`,
`rel_error_max`, ...) are over the (adapter, module) pairs. Bytes are tensor data in the storage
dtype: uncompressed = every A and B at its real rank, compressed = bases + cores.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Mapping

from slora_plugin.layout import MODULES

#: errors[name][module][layer] = (‖ΔW‖_F, ‖ΔW − UΣVᵀ‖_F)
Errors = Mapping[str, Mapping[str, Mapping[int, tuple[float, float]]]]


def build_report(options: Mapping[str, object], clusters: Mapping[str, int], errors: Errors,
                 uncompressed_bytes: Mapping[str, int], core_bytes: Mapping[str, int], bases_bytes: int,
                 source_file_bytes: int) -> dict:
    """The report as a JSON-able dict (see the module docstring)."""
    per_adapter = {}
    pair_errors: list[float] = []
    for name in sorted(errors):
        modules = {}
        total_n2 = total_e2 = 0.0
        for module in (m for m in MODULES if m in errors[name]):
            layers = errors[name][module]
            n2 = sum(n * n for n, _ in layers.values())
            e2 = sum(e * e for _, e in layers.values())
            total_n2, total_e2 = total_n2 + n2, total_e2 + e2
            rel = _relative(e2, n2)
            pair_errors.append(rel)
            modules[module] = {"rel_error": rel,
                               "layers": {str(l): _relative(e * e, n * n) for l, (n, e) in sorted(layers.items())}}
        per_adapter[name] = {"cluster": clusters[name], "rel_error": _relative(total_e2, total_n2),
                             "uncompressed_bytes": uncompressed_bytes[name], "core_bytes": core_bytes[name],
                             "modules": modules}
    uncompressed = sum(uncompressed_bytes.values())
    compressed = bases_bytes + sum(core_bytes.values())
    n = len(per_adapter)
    return {
        **options,
        "adapters": n,
        "rel_error_mean": statistics.fmean(pair_errors) if pair_errors else 0.0,
        "rel_error_median": statistics.median(pair_errors) if pair_errors else 0.0,
        "rel_error_max": max(pair_errors, default=0.0),
        "bytes": {"uncompressed": uncompressed, "compressed": compressed, "bases": bases_bytes,
                  "cores": compressed - bases_bytes, "ratio": compressed / uncompressed if uncompressed else 0.0,
                  "per_adapter_uncompressed_mean": uncompressed / n if n else 0,
                  "per_adapter_cores_mean": (compressed - bases_bytes) / n if n else 0,
                  "source_files": source_file_bytes},
        "per_adapter": per_adapter,
    }


def render_markdown(report: Mapping[str, object]) -> str:
    """A summary and one row per adapter: relative error overall and per module."""
    b = report["bytes"]
    per = report["per_adapter"]
    assert isinstance(b, dict) and isinstance(per, dict)
    modules = [m for m in MODULES if any(m in e["modules"] for e in per.values())]
    core = "diagonal" if report.get("diagonal") else "full"
    lines = [
        f"# Compressed collection: {report['adapters']} adapters, rank {report['rank']}, "
        f"{report['clusters']} cluster(s), {core} cores, {report['dtype']}",
        "",
        f"- bytes: {_size(b['uncompressed'])} uncompressed -> {_size(b['compressed'])} compressed "
        f"(bases {_size(b['bases'])}, cores {_size(b['cores'])}; ratio {b['ratio']:.3f})",
        f"- per adapter: {_size(b['per_adapter_uncompressed_mean'])} uncompressed, "
        f"{_size(b['per_adapter_cores_mean'])} of cores (+ its share of the bases)",
        f"- relative error ‖ΔW − UΣVᵀ‖_F / ‖ΔW‖_F per (adapter, module), over its layers: "
        f"mean {report['rel_error_mean']:.4f}, median {report['rel_error_median']:.4f}, "
        f"max {report['rel_error_max']:.4f}",
        "",
        "| adapter | cluster | all | " + " | ".join(modules) + " |",
        "|---|---:|---:|" + "---:|" * len(modules),
    ]
    for name, entry in per.items():
        cells = [f"{entry['modules'][m]['rel_error']:.4f}" if m in entry["modules"] else "-" for m in modules]
        lines.append(f"| {name} | {entry['cluster']} | {entry['rel_error']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: Mapping[str, object]) -> tuple[str, str]:
    """report.json and report.md in `out_dir`; their paths."""
    paths = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
    return paths


def _relative(err2: float, norm2: float) -> float:
    """sqrt(err2 / norm2); 0 for a zero ΔW (its core is zero, so is the error)."""
    return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def summary_line(report: Mapping[str, object]) -> str:
    """One line for the CLI."""
    b = report["bytes"]
    assert isinstance(b, dict)
    return (f"{report['adapters']} adapters -> rank {report['rank']}, {report['clusters']} cluster(s): "
            f"{_size(b['uncompressed'])} -> {_size(b['compressed'])} (ratio {b['ratio']:.3f}); relative error "
            f"mean {report['rel_error_mean']:.4f}, max {report['rel_error_max']:.4f}")

