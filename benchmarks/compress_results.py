"""Issue 15's results file from throughput results: compressed rows beside the same adapters
uncompressed and the base model (slora_plugin.bench.compress_rows).

    python benchmarks/compress_results.py benchmarks/results/throughput-*-2026MMDD-*.json \
        [--out benchmarks/results/compress-<date>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from slora_plugin.bench.compress_rows import compress_rows, markdown

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="throughput results files of one device session")
    p.add_argument("--out", help="default: benchmarks/results/compress-<date>.json")
    args = p.parse_args(argv)
    try:
        result = compress_rows(args.paths)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result["rows"]:
        print("error: no compressed rows (runs of `bench run --compress-rank K`) in these files", file=sys.stderr)
        return 2
    out = args.out or os.path.join(HERE, "results", f"compress-{result['date']}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
