"""Throughput benchmark on the GPU: one system (base, stock, plugin) over several traces.

Same as `slora-plugin bench run ...` (see `slora_plugin.bench.cli`), except that results go by
default to this folder's `results/`, wherever the command is started. The plugin must be
installed (editable for development, `bash benchmarks/gpu_run.sh install` on the GPU host):
nothing here adds the repository to sys.path, because from the repository root its `kernels/`
and `slora_plugin/` folders would shadow the installed packages. Run it from any directory, e.g.

    cd /tmp && PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 \\
        python /path/to/repo/benchmarks/throughput.py --system stock --n-adapters 1,100,1000 --out-dir $OUT

The `__main__` guard matters: vLLM starts its engine core with `spawn` here (see
`slora_plugin.bench.run`), and a spawned child imports this file again as `__mp_main__`.
"""

import os
import sys

from slora_plugin.bench.cli import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], results_dir=RESULTS))
