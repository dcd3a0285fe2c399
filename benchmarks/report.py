"""Tables and plots from throughput results (no GPU): same as `slora-plugin bench report`.

    python benchmarks/report.py benchmarks/results/throughput-*.json --out-dir benchmarks/results
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slora_plugin.bench_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
