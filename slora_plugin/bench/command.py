"""What a results file's `command` (the harness command line it ran) says of the run.

Its own module because both the roofline (`roofline_rows`, which imports the report's
`shape_key`) and the report read it.
"""

from __future__ import annotations

import os
import shlex


def model_arg(command: str) -> str:
    """The `--model` of a harness command line (`--model X` or `--model=X`), 'llama-2-7b' (the
    harness's default) when it names none."""
    argv = shlex.split(command)
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return "llama-2-7b"


def model_name(command: str) -> str:
    """The --model the harness command ran (its basename), 'llama-2-7b' by default."""
    return os.path.basename(model_arg(command).rstrip("/"))
