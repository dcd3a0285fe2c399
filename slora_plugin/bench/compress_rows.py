"""The compression results of issue 15 (`compress-<date>.json`) from throughput results files.

A compressed run (`bench run --compress-rank K`, rows with `compressed`) is compared with the
plain plugin run of the same adapters and the base model, all on one device and model: for each
compressed row, the newest base row and the newest plain plugin row with the same trace shape,
adapter count, ranks and modules. A workload is named by the model the command ran (`--model`,
basename; the harness's default is llama-2-7b) and the adapters' modules.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, Mapping

from slora_plugin.bench.report import all_rows, load_results, shape_key

#: Keys of every row of compress-*.json (issue 15), in this order.
ROW_KEYS = ("workload", "n_adapters", "rank_k", "clusters", "rel_error_mean", "rel_error_max",
            "output_tok_per_s", "base_output_tok_per_s", "uncompressed_output_tok_per_s",
            "of_base", "uncompressed_of_base")


def compress_rows(paths: Iterable[str]) -> dict[str, Any]:
    """`{"date", "device", "rows"}` over the compressed rows of `paths` (see the module docstring).
    ValueError when the files come from several devices or a compressed row has no base row."""
    rows: list[dict[str, Any]] = []
    results = sorted(load_results(paths), key=lambda r: r["date"])
    devices = {r["device"] for r in results}
    if len(devices) != 1:
        raise ValueError(f"results from {len(devices)} devices ({sorted(devices)}): compare one device's runs")
    flat = [row for row in all_rows(results) if not row.get("profiled")]
    for row in flat:
        if row["system"] != "plugin" or not row.get("compressed"):
            continue
        shape = shape_key(row["workload"])
        same = lambda other: other["_shape"] == row["_shape"]  # noqa: E731 - same model and trace shape
        base = _newest(o for o in flat if o["system"] == "base" and same(o))
        if base is None:
            raise ValueError(f"no base row of {row['_model']}, {shape} for the compressed row {row['trace']}")
        plain = _newest(o for o in flat if o["system"] == "plugin" and not o.get("compressed") and same(o)
                        and o["n_adapters"] == row["n_adapters"] and o["ranks"] == row["ranks"]
                        and o["adapter_modules"] == row["adapter_modules"])
        c, out, b = row["compressed"], row["output_tok_per_s"], base["output_tok_per_s"]
        u = plain["output_tok_per_s"] if plain else None
        rows.append({
            "workload": f"{row['_model']}, {','.join(row['adapter_modules'])}, ranks "
                        f"{min(row['ranks'])}-{max(row['ranks'])}, {shape}",
            "n_adapters": row["n_adapters"], "rank_k": c["rank_k"], "clusters": c["clusters"],
            "rel_error_mean": c["rel_error_mean"], "rel_error_max": c["rel_error_max"],
            "output_tok_per_s": out, "base_output_tok_per_s": b, "uncompressed_output_tok_per_s": u,
            "of_base": round(out / b, 3), "uncompressed_of_base": None if u is None else round(u / b, 3)})
    return {"date": _dt.date.today().isoformat(), "device": devices.pop(), "rows": rows}


def _newest(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    found = list(rows)
    return found[-1] if found else None


def markdown(result: Mapping[str, Any]) -> str:
    lines = ["| workload | adapters | K | rel. error mean / max | compressed tok/s | uncompressed tok/s "
             "| base tok/s | compressed / base | uncompressed / base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        u = "-" if r["uncompressed_output_tok_per_s"] is None else f"{r['uncompressed_output_tok_per_s']:,.0f}"
        ub = "-" if r["uncompressed_of_base"] is None else f"{r['uncompressed_of_base']:.2f}"
        lines.append(f"| {r['workload']} | {r['n_adapters']:,} | {r['rank_k']} | {r['rel_error_mean']:.3f} / "
                     f"{r['rel_error_max']:.3f} | {r['output_tok_per_s']:,.0f} | {u} | "
                     f"{r['base_output_tok_per_s']:,.0f} | {r['of_base']:.2f} | {ub} |")
    return "\n".join(lines)
