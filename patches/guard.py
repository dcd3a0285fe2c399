"""Fail loudly at start on a vLLM the patches were not written for.

Every file in this package changes one vLLM component and declares, as `REQUIRES`, the private
names (and the parameters of the functions) it relies on. `enforce()` checks all of them before
anything is patched, and stops start-up with one message that names the installed vLLM, each
missing or changed name, and the version the plugin supports. A vLLM upgrade then shows up as a
clear error at `LLM(...)` / `vllm serve`, never as wrong tokens.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable

#: The one vLLM release every patch was written and tested against.
SUPPORTED_VLLM = "0.26.0"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks (or changed) something a patch relies on."""


@dataclass(frozen=True)
class Requires:
    """`target` is "package.module:Qualified.name"; `params`, if given, must be a prefix-free
    subset of the callable's parameter names (all present; order not checked)."""

    target: str
    params: tuple[str, ...] | None = None

    def problem(self) -> str | None:
        """None if satisfied, else a one-line description of what is wrong."""
        module_name, _, qualname = self.target.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
        except ImportError as e:
            return f"{self.target}: module {module_name} cannot be imported ({e})"
        for part in qualname.split(".") if qualname else ():
            if not hasattr(obj, part):
                return f"{self.target}: {part!r} is missing"
            obj = getattr(obj, part)
        if self.params is not None:
            try:
                have = set(inspect.signature(obj).parameters)  # type: ignore[arg-type]
            except (TypeError, ValueError) as e:
                return f"{self.target}: signature cannot be read ({e})"
            missing = [p for p in self.params if p not in have]
            if missing:
                return f"{self.target}: parameter(s) {missing} missing (has {sorted(have)})"
        return None


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def problems(patch_modules: Iterable[ModuleType]) -> list[str]:
    """Every unmet requirement of the given patch modules, each prefixed by its patch file."""
    found = []
    for mod in patch_modules:
        for req in getattr(mod, "REQUIRES"):
            p = req.problem()
            if p:
                found.append(f"[{mod.__name__.rsplit('.', 1)[-1]}] {p}")
    return found


def enforce(patch_modules: Iterable[ModuleType], allow_untested_version: bool = False) -> None:
    """Raise UnsupportedVLLMError unless every patch's requirements hold (and the version matches)."""
    version = installed_vllm_version()
    found = problems(patch_modules)
    if version != SUPPORTED_VLLM and not allow_untested_version:
        found.insert(0, f"vLLM {version} is installed; this plugin is written for {SUPPORTED_VLLM} "
                        f"(set slora.allow_untested_vllm=true to try anyway)")
    if found:
        lines = "\n  - ".join(found)
        raise UnsupportedVLLMError(
            f"slora-plugin cannot start on vLLM {version} (supported: vLLM {SUPPORTED_VLLM}):\n"
            f"  - {lines}\nInstall vllm=={SUPPORTED_VLLM} or disable the plugin.")
