"""Throughput benchmark on the GPU: one system (base, stock, plugin) over several traces.

Same as `slora-plugin bench run ...`; see benchmarks/README.md for the commands. Run from the
repository root, e.g.

    PYTHONPATH=/tmp/site:. VLLM_USE_FLASHINFER_SAMPLER=0 \\
        python benchmarks/throughput.py --system stock --n-adapters 1,100,1000 --out-dir $OUT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slora_plugin.bench_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
