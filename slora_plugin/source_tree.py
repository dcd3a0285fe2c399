"""`slora_plugin.kernels` and `slora_plugin.patches` in a source checkout.

The repository keeps `kernels/` and `patches/` beside `slora_plugin/` (the user's layout), and the
wheel installs them as `slora_plugin/kernels/` and `slora_plugin/patches/`. In the checkout the
two folders carry no `__init__.py`, on purpose: `python -m`/`python -c` put the working directory
first on `sys.path` (vLLM inspects models in such a child), and a regular package `kernels` or
`patches` in the repository root would hide the PyPI packages of those names for every process
started there (transformers >= 5.25 imports `kernels` when it loads). A folder without
`__init__.py` is only a namespace portion, which never wins over an installed package.

setuptools' editable finder cannot import a namespace subpackage mapped outside its parent's
folder, and a wheel installed next to a checkout is shadowed by the checkout's `slora_plugin/` when
run from the root. So when `slora_plugin` is imported from a checkout, this module makes the two
sibling folders its subpackages directly; installed from a wheel it finds them inside the package
and does nothing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

#: Repository folders installed as subpackages of `slora_plugin`, each with a file that marks it
#: as ours (so a `slora_plugin/` copied without them never mounts another project's folder).
SIBLING_SUBPACKAGES = {"kernels": "lora_linear.py", "patches": "guard.py"}


def mount_sibling_folders(package: ModuleType) -> list[str]:
    """Give `package` the checkout's sibling folders as namespace subpackages; returns their names.

    Cheap (a few `stat` calls): `slora_plugin` is imported in every vLLM process."""
    here = package.__path__[0]
    root = os.path.dirname(os.path.abspath(here))
    mounted = []
    for name, marker in SIBLING_SUBPACKAGES.items():
        full = f"{package.__name__}.{name}"
        folder = os.path.join(root, name)
        if (full in sys.modules or os.path.isdir(os.path.join(here, name))
                or not os.path.isfile(os.path.join(folder, marker))):
            continue
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [folder]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        setattr(package, name, module)
        mounted.append(name)
    return mounted
