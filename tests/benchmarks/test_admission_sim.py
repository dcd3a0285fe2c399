"""benchmarks/admission_sim.py: the byte-model simulation of admission by adapter bytes runs,
serves every request, and keeps the bound on held steps."""

from __future__ import annotations

import os
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "admission_sim.py")


def test_simulation_with_and_without_the_policy(capsys):
    ns = runpy.run_path(SCRIPT, run_name="admission_sim")
    assert ns["main"](["--n-adapters", "20", "--requests", "120", "--budgets", "off,0.05",
                       "--max-wait", "4", "--max-num-seqs", "32", "--output-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "MODEL, not a measurement" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 20 |")]
    off, on = ([c.strip() for c in row] for row in rows)
    assert off[1] == "off" and on[1] == "0.05"
    assert float(on[3]) < float(off[3])  # fewer distinct adapters per step
    assert int(on[7]) <= 4  # no request held more than max_wait steps
