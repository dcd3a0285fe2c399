"""Roofline of recorded throughput runs, on CPU (no GPU, no vLLM engine): for every row of the
given results files, what the run's steps had to move and how fast that could go
(`slora_plugin.roofline`, `slora_plugin.bench.roofline_rows`), against what was measured. Rows recorded
before the runner kept each engine step's end time get their steps reconstructed from the
per-request records. Prints one markdown table; the results files are not changed.

    python benchmarks/roofline.py                      # every throughput-*.json in results/
    python benchmarks/roofline.py results/throughput-plugin-20261123-033649.json --copy-gbps 3005
    python benchmarks/roofline.py --plot results/roofline-recorded.png   # and bench report's plot

Each row is calibrated on the newest base row of the same trace shape and device among all
results files in the folder of the first file (see `bench.roofline_rows.find_base`).
"""

import argparse
import glob
import json
import os
import sys

from slora_plugin.bench.report import plot_roofline
from slora_plugin.bench.roofline_rows import fill_file, roofline_table
from slora_plugin.roofline import H100_COPY_GBPS, H100_PEAK_TFLOPS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="roofline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help=f"results files or globs (default {RESULTS}/throughput-*.json)")
    p.add_argument("--copy-gbps", type=float, default=H100_COPY_GBPS,
                   help="measured device-to-device copy bandwidth, GB/s (default: the H100's)")
    p.add_argument("--peak-tflops", type=float, default=H100_PEAK_TFLOPS,
                   help="dense fp16 peak, TFLOP/s (default: the H100 SXM's)")
    p.add_argument("--plot", help="also draw measured vs roofline per row into this PNG")
    args = p.parse_args(argv)
    patterns = args.paths or [os.path.join(RESULTS, "throughput-*.json")]
    paths = sorted({q for pat in patterns for q in (glob.glob(pat) or [pat])})
    if not paths:
        print("error: no results files", file=sys.stderr)
        return 2
    candidates = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(paths[0])), "throughput-*.json")))
    try:
        filled = [(path, fill_file(path, candidates, args.copy_gbps, args.peak_tflops)) for path in paths]
        table = roofline_table([(os.path.basename(path), rows) for path, rows in filled])
        if args.plot:
            results = []
            for path, rows in filled:
                with open(path, encoding="utf-8") as f:
                    results.append({**json.load(f), "rows": rows, "_file": os.path.basename(path)})
            print(f"plot: {plot_roofline(results, args.plot)}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nCopy bandwidth {args.copy_gbps:g} GB/s, fp16 peak {args.peak_tflops:g} TFLOP/s.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
