"""No top-level folder of the repository hides an installed package, from the repository root.

`python -m` and `python -c` put the working directory first on `sys.path`, and vLLM inspects
models in a `python -m vllm.model_executor.models.registry` child. A regular package named
`kernels/` or `patches/` at the root would then shadow the PyPI packages of those names
(transformers >= 5.25 imports `kernels` when it loads). The folders are namespace portions
instead (no `__init__.py`): a namespace portion never wins over a regular package, while
`slora_plugin.kernels` / `slora_plugin.patches` import through the install's mapping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The one top-level folder that is meant to be importable under its own name.
OWN_PACKAGE = "slora_plugin"
#: What setup.py builds the wheel from.
WHEEL_SOURCES = ("setup.py", "README.md", "LICENSE", "slora_plugin", "kernels", "patches")

_PROBE = textwrap.dedent(
    """
    import importlib, importlib.metadata, importlib.util, json, os, sys
    root = os.path.realpath(sys.argv[1])
    names = json.loads(sys.argv[2])
    import transformers.activations  # imports the PyPI `kernels` package on transformers >= 5.25

    def in_folder(path, name):  # the checkout's folder itself, not e.g. a .venv inside the root
        return os.path.realpath(path).startswith(os.path.join(root, name) + os.sep)

    hidden = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.origin not in (None, "namespace") and in_folder(spec.origin, name):
            hidden.append(f"{name} -> {spec.origin}")
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        module = importlib.import_module(name)
        if in_folder(getattr(module, "__file__", None) or "", name):
            hidden.append(f"{name}: installed {dist.version} hidden by the checkout")
    print(json.dumps(hidden))
    """
)


def _top_level_folders() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CACHE_ROOT"] = str(tmp_path / "vllm-cache")  # no model-info cache from earlier runs
    env.pop("PYTHONPATH", None)
    return env


def test_only_the_package_folder_is_a_regular_package():
    regular = [name for name in _top_level_folders() if (ROOT / name / "__init__.py").exists()]
    assert regular == [OWN_PACKAGE], (
        f"top-level folders with __init__.py would shadow PyPI packages of their name: {regular}"
    )


def test_python_m_child_in_the_root_sees_installed_packages(tmp_path):
    probe = tmp_path / "probe_dir"
    probe.mkdir()
    (probe / "shadow_probe.py").write_text(_PROBE)
    env = _child_env(tmp_path)
    env["PYTHONPATH"] = str(probe)  # the probe module only; the root still comes first for -m
    names = [n for n in _top_level_folders() if n != OWN_PACKAGE]
    done = subprocess.run(
        [sys.executable, "-m", "shadow_probe", str(ROOT), json.dumps(names)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_vllm_registry_inspects_the_model_from_the_root(tmp_path, tiny_model_dir):
    """vLLM's own `python -m` model-inspection child, with an empty model-info cache."""
    code = textwrap.dedent(
        f"""
        from vllm.config import ModelConfig
        config = ModelConfig(model={tiny_model_dir!r})
        print(config.architectures)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_child_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LlamaForCausalLM" in done.stdout
    assert (tmp_path / "vllm-cache" / "modelinfos").is_dir(), "the inspection did not run afresh"


@pytest.mark.parametrize("subpackage", ["slora_plugin.kernels.lora_linear", "slora_plugin.patches.guard"])
def test_installed_subpackages_import_from_elsewhere(tmp_path, subpackage):
    done = subprocess.run([sys.executable, "-c", f"import {subpackage} as m; print(m.__file__)"],
                          cwd=tmp_path, env=_child_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = Path(done.stdout.split()[-1]).resolve()
    folder = subpackage.split(".")[1]  # kernels / patches
    in_checkout = found.is_relative_to((ROOT / folder).resolve())  # editable install
    in_install = found.parent.name == folder and found.parent.parent.name == OWN_PACKAGE
    assert in_checkout or in_install, found


def test_wheel_installs_the_subpackages_inside_the_package(tmp_path):
    """Installed from a wheel, the subpackages are real folders of the package and the checkout
    plays no part (run from elsewhere); run from the root, the checkout's own copy imports whole."""
    # Built from a copy: a build in the checkout leaves a build/ folder whose stale files a later
    # build would put in the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("slora_plugin-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    assert (site / "slora_plugin" / "kernels" / "lora_linear.py").is_file()
    assert (site / "slora_plugin" / "patches" / "guard.py").is_file()
    assert (site / "slora_plugin" / "bench" / "cli.py").is_file()  # `slora-plugin` imports it at start
    assert not (site / "kernels").exists() and not (site / "patches").exists()
    code = ("import slora_plugin.kernels.lora_linear as k, slora_plugin.patches.guard as g; "
            "print(k.__file__); print(g.__file__)")
    env = _child_env(tmp_path)
    env["PYTHONPATH"] = str(site)
    for cwd, expected in ((tmp_path, site), (ROOT, ROOT)):
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        files = [Path(line).resolve() for line in done.stdout.split()]
        assert all(f.is_relative_to(expected.resolve()) for f in files), (cwd, files)
