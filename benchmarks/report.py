"""Tables and plots from throughput results (no GPU): same as `slora-plugin bench report`, with
this folder's `results/` as the default input and output, wherever the command is started.

    python benchmarks/report.py benchmarks/results/throughput-*.json --out-dir benchmarks/results
"""

import os
import sys

from slora_plugin.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]], results_dir=RESULTS))
