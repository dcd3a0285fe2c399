"""Load a test-only helper module of tests/ by its file, for the GPU benchmark scripts.

The synthetic pool builders are test code, not shipped in the package. Putting tests/ on sys.path
instead would make its sub-folders (`tests/kernels/`, ...) importable as top-level namespace
packages named like PyPI packages (`kernels`), exactly what the repository avoids.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def load_test_module(relpath: str) -> ModuleType:
    """tests/`relpath` as a module named after its file (registered before it runs: @dataclass
    looks its module up in sys.modules)."""
    path = os.path.join(TESTS, relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
