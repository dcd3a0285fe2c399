"""Fail loudly at start on a vLLM the patches were not written for.

Every patch file changes one vLLM component and declares, as `REQUIRES`, what it relies on:

- `Requires`: a name it reads or calls (and the parameters it passes);
- `Overrides`: a vLLM callable it overrides, wraps or replaces, with vLLM's full signature as it
  was written against (`signature`) and its own (`by_signature`): vLLM calls our code with
  what *its* signature allows, so a new parameter (0.27's `_preempt_request(...,
  drop_stale_output)`) must be caught before the engine runs, not by a TypeError mid-step;
- `InstanceAttributes`: attributes vLLM sets on its instances (`self.x = ...`, invisible on the
  class). Parsing vLLM's source at every start would cost seconds, so at start `enforce()` only
  checks that the class exists; the attributes themselves are checked on live instances where
  the glue is built for the scheduler, its KV cache manager and block pool and the LoRA model
  manager (`check_instances`), and for every declaration, from source, by the port check.

`enforce()` checks the names and signatures before anything is patched and stops start-up with one message
that names the installed vLLM, each missing or changed name (for a changed signature: the
expected and the found one) and the version the plugin supports. With
`slora.allow_untested_vllm` a vLLM other than `SUPPORTED_VLLM` may run, and so may an
overridden method whose signature changed in a way our override still accepts (logged as a
warning); a missing name, or a call our override cannot take, always stops start-up.

The same checks run on a vLLM that is not installed, from its source
(`python -m slora_plugin.patches.port_check WHEEL_OR_DIR`): a `Lookup` finds the targets either
by import (`ImportLookup`, at start) or in parsed source (`port_check.SourceChecks`).
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Protocol

#: The one vLLM release every patch was written and tested against (setup.py pins the same).
SUPPORTED_VLLM = "0.26.0"

#: A default value the running process cannot name (an object made at import): matches any.
OPAQUE = "..."

logger = logging.getLogger("vllm.slora.guard")


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks (or changed) something a patch relies on."""


# ---------------------------------------------------------------------------- signatures

@dataclass(frozen=True)
class Param:
    """One parameter: its name, its `inspect.Parameter` kind name, its default as source
    text (None: required; `OPAQUE`: an object without a name). Annotations are ignored: they
    do not change what a call may pass."""

    name: str
    kind: str
    default: str | None = None


def _literal(value: Any) -> bool:
    """Whether `repr(value)` is source that evaluates back to it (sets excluded: their repr's
    order is not stable)."""
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return True
    if type(value) in (tuple, list):
        return all(_literal(v) for v in value)
    if type(value) is dict:
        return all(_literal(k) and _literal(v) for k, v in value.items())
    return False


def _value_text(value: Any, namespace: dict[str, Any]) -> str:
    """A runtime default as its source reads (`_source_default` renders the source side the
    same way): a literal's repr, `Enum.MEMBER`, or the module-level name bound to it."""
    if _literal(value):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    for name, obj in namespace.items():
        if obj is value and not name.startswith("__"):
            return name
    return OPAQUE


def _source_default(node: ast.expr) -> str:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ast.unparse(node)
    return repr(value) if _literal(value) else ast.unparse(node)


def params_of_node(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> tuple[Param, ...]:
    """The parameters of a parsed function."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += a.defaults
    out = [Param(p.arg,
                 "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD",
                 _source_default(d) if d is not None else None)
           for i, (p, d) in enumerate(zip(positional, defaults))]
    if a.vararg is not None:
        out.append(Param(a.vararg.arg, "VAR_POSITIONAL"))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append(Param(p.arg, "KEYWORD_ONLY", _source_default(d) if d is not None else None))
    if a.kwarg is not None:
        out.append(Param(a.kwarg.arg, "VAR_KEYWORD"))
    return tuple(out)


def parse_signature(text: str) -> tuple[Param, ...]:
    """Parameters of a signature written as Python, e.g. "(self, request, *, flag=False)"."""
    fn = ast.parse(f"def _{text}: pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    return params_of_node(fn)


def params_of(obj: Any, follow_wrapped: bool = True) -> tuple[Param, ...]:
    """The parameters of a live callable (raises TypeError/ValueError if unreadable)."""
    sig = inspect.signature(obj, follow_wrapped=follow_wrapped)
    target = inspect.unwrap(obj) if follow_wrapped else obj
    namespace = getattr(target, "__globals__", {})
    return tuple(Param(p.name, p.kind.name, None if p.default is inspect.Parameter.empty
                       else _value_text(p.default, namespace))
                 for p in sig.parameters.values())


def render(params: Iterable[Param]) -> str:
    """Parameters as Python source, the form signatures are recorded in."""
    parts: list[str] = []
    params = list(params)
    kinds = [p.kind for p in params]
    for i, p in enumerate(params):
        if p.kind == "KEYWORD_ONLY" and "VAR_POSITIONAL" not in kinds and \
                (i == 0 or params[i - 1].kind != "KEYWORD_ONLY"):
            parts.append("*")
        if p.kind == "VAR_POSITIONAL":
            parts.append(f"*{p.name}")
        elif p.kind == "VAR_KEYWORD":
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name if p.default is None else f"{p.name}={p.default}")
        if p.kind == "POSITIONAL_ONLY" and (i + 1 == len(params)
                                            or params[i + 1].kind != "POSITIONAL_ONLY"):
            parts.append("/")
    return f"({', '.join(parts)})"


def same_signature(expected: tuple[Param, ...], found: tuple[Param, ...]) -> bool:
    """Names, kinds and defaults equal (an `OPAQUE` default equals any default)."""
    return len(expected) == len(found) and all(
        e.name == f.name and e.kind == f.kind and (
            e.default == f.default or (e.default is not None and f.default is not None
                                       and OPAQUE in (e.default, f.default)))
        for e, f in zip(expected, found))


def _unbound(params: tuple[Param, ...]) -> tuple[Param, ...]:
    return params[1:] if params and params[0].name == "self" else params


def refusals(vllm: tuple[Param, ...], ours: tuple[Param, ...]) -> list[str]:
    """What a call allowed by vLLM's signature could pass that ours cannot take (empty: ours
    accepts every such call). A leading `self` is dropped on both sides (our replacement may
    be set on the instance). Each parameter vLLM may pass positionally must land in ours at the
    same position under the same name, or in `*args`; each it may pass by name, in a parameter
    of that name or `**kwargs`; and every parameter ours requires, vLLM must always pass."""
    vllm, ours = _unbound(vllm), _unbound(ours)
    positional = [p for p in ours if p.kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    by_name = {p.name: p for p in ours if p.kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY")}
    has_args = any(p.kind == "VAR_POSITIONAL" for p in ours)
    has_kwargs = any(p.kind == "VAR_KEYWORD" for p in ours)
    out = []
    for i, p in enumerate(vllm):
        if p.kind == "VAR_POSITIONAL" and not has_args:
            out.append(f"*{p.name} (ours has no *args)")
        elif p.kind == "VAR_KEYWORD" and not has_kwargs:
            out.append(f"**{p.name} (ours has no **kwargs)")
        if p.kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"):
            if i < len(positional):
                if positional[i].name != p.name and p.kind == "POSITIONAL_OR_KEYWORD":
                    out.append(f"{p.name} at position {i} (ours names it {positional[i].name!r})")
            elif not has_args:
                out.append(f"{p.name} at position {i}")
        if p.kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and p.name not in by_name and \
                not has_kwargs:
            out.append(f"{p.name} by name")
    always = {p.name for p in vllm if p.default is None and
              p.kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY")}
    for i, p in enumerate(ours):
        if p.default is None and p.kind not in ("VAR_POSITIONAL", "VAR_KEYWORD") and \
                p.name not in always and not (p.kind != "KEYWORD_ONLY" and i < len(vllm)
                                              and vllm[i].default is None):
            out.append(f"ours requires {p.name}, which vLLM may not pass")
    return out


# ---------------------------------------------------------------------------- lookups

class Lookup(Protocol):
    """Where targets ("package.module:Qualified.name") are found."""

    def params(self, target: str) -> tuple[Param, ...] | str:
        """The target's parameters (a class: its constructor's), or why they cannot be had."""

    def exists(self, target: str) -> str | None:
        """None if the target exists, else why not."""

    def instance_attributes(self, target: str) -> set[str] | str | None:
        """What instances of the class `target` have after construction, why that cannot be
        known, or None: not checked by this lookup."""


class ImportLookup:
    """The installed vLLM, by import."""

    def _resolve(self, target: str) -> Any:
        module_name, _, qualname = target.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
        except ImportError as e:
            raise LookupError(f"module {module_name} cannot be imported ({e})") from e
        for part in qualname.split(".") if qualname else ():
            if not hasattr(obj, part):
                raise LookupError(f"{part!r} is missing")
            obj = getattr(obj, part)
        return obj

    def exists(self, target: str) -> str | None:
        try:
            self._resolve(target)
        except LookupError as e:
            return str(e)
        return None

    def params(self, target: str) -> tuple[Param, ...] | str:
        try:
            obj = self._resolve(target)
        except LookupError as e:
            return str(e)
        try:
            return params_of(obj)
        except (TypeError, ValueError) as e:
            return f"signature cannot be read ({e})"

    def instance_attributes(self, target: str) -> set[str] | str | None:
        """Not checked at start (see the module docstring); the class must exist."""
        return self.exists(target)


# ---------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Problem:
    """One unmet requirement. `untested`: only a difference from the vLLM the patch was
    written against, which `allow_untested_vllm` tolerates; otherwise the patch cannot work."""

    text: str
    untested: bool = False


@dataclass(frozen=True)
class Requires:
    """`target` is "package.module:Qualified.name"; `params`, if given, must all be parameter
    names of the callable (of a class: its constructor's; order not checked)."""

    target: str
    params: tuple[str, ...] | None = None

    def check(self, lookup: Lookup) -> list[Problem]:
        if self.params is None:
            missing = lookup.exists(self.target)
            return [Problem(f"{self.target}: {missing}")] if missing else []
        have = lookup.params(self.target)
        if isinstance(have, str):
            return [Problem(f"{self.target}: {have}")]
        names = {p.name for p in have}
        missing_params = [p for p in self.params if p not in names]
        if missing_params:
            return [Problem(f"{self.target}: parameter(s) {missing_params} missing "
                            f"(has {sorted(names)})")]
        return []


@dataclass(frozen=True)
class Overrides:
    """vLLM's callable `target` is overridden, wrapped or replaced by ours, `by` (a
    "module:Qualified.name" of this package; `<locals>` for a closure made by a patch
    function). `signature` is vLLM's as written against, `by_signature` ours, both as
    `render` writes them; tests check `by_signature` against the code."""

    target: str
    signature: str
    by: str
    by_signature: str

    def check(self, lookup: Lookup) -> list[Problem]:
        found = lookup.params(self.target)
        if isinstance(found, str):
            return [Problem(f"{self.target}: {found}")]
        expected = parse_signature(self.signature)
        if same_signature(expected, found):
            return []
        changed = (f"{self.target}: signature changed: expected {self.signature}, "
                   f"found {render(found)}")
        refused = refusals(found, parse_signature(self.by_signature))
        if refused:
            return [Problem(f"{changed}; our override {self.by}{self.by_signature} cannot "
                            f"take: {'; '.join(refused)}")]
        return [Problem(f"{changed} (our override {self.by} accepts it)", untested=True)]


@dataclass(frozen=True)
class InstanceAttributes:
    """Attributes the patches (or the glue) read on instances of vLLM's class `target` that
    vLLM sets in its methods (`self.name = ...`), so that the class itself does not show."""

    target: str
    names: tuple[str, ...]

    def check(self, lookup: Lookup) -> list[Problem]:
        have = lookup.instance_attributes(self.target)
        if have is None:
            return []
        if isinstance(have, str):
            return [Problem(f"{self.target}: {have}")]
        missing = [n for n in self.names if n not in have]
        if not missing:
            return []
        return [Problem(f"{self.target}: instance attribute(s) {missing} never set")]

    def missing_on(self, instance: object) -> list[str]:
        """The declared attributes a live instance lacks."""
        return [n for n in self.names if not hasattr(instance, n)]


Declaration = Requires | Overrides | InstanceAttributes


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check(patch_modules: Iterable[ModuleType], lookup: Lookup) -> list[Problem]:
    """Every unmet requirement of the given patch modules, each prefixed by its patch file."""
    found = []
    for mod in patch_modules:
        short = mod.__name__.rsplit(".", 1)[-1]
        for req in getattr(mod, "REQUIRES"):
            found += [Problem(f"[{short}] {p.text}", p.untested) for p in req.check(lookup)]
    return found


def problems(patch_modules: Iterable[ModuleType]) -> list[str]:
    """Every unmet requirement on the installed vLLM, as lines (see `check`)."""
    return [p.text for p in check(patch_modules, ImportLookup())]


def enforce(patch_modules: Iterable[ModuleType], allow_untested_version: bool = False) -> None:
    """Raise UnsupportedVLLMError unless every patch's requirements hold and the version
    matches. With `allow_untested_version` another version passes (silently, as it always
    did) and so do signature changes our overrides accept (each logged as a warning)."""
    version = installed_vllm_version()
    found = check(patch_modules, ImportLookup())
    if allow_untested_version:
        for p in found:
            if p.untested:
                logger.warning("slora: untested vLLM: %s", p.text)
        found = [p for p in found if not p.untested]
    elif version != SUPPORTED_VLLM:
        found.insert(0, Problem(f"vLLM {version} is installed; this plugin is written for "
                                f"{SUPPORTED_VLLM} (set slora.allow_untested_vllm=true to try "
                                f"anyway)"))
    if found:
        lines = "\n  - ".join(p.text for p in found)
        raise UnsupportedVLLMError(
            f"slora-plugin cannot start on vLLM {version} (supported: vLLM {SUPPORTED_VLLM}):\n"
            f"  - {lines}\nInstall vllm=={SUPPORTED_VLLM} or disable the plugin.")


def check_instances(what: str, checks: Iterable[tuple[object, InstanceAttributes]]) -> None:
    """At construction: fail naming the declared attributes live vLLM instances lack (the
    source check at start cannot see an attribute deleted or set only on some paths)."""
    missing = [f"{d.target.rpartition(':')[2]}.{n}" for instance, d in checks
               for n in d.missing_on(instance)]
    if missing:
        raise UnsupportedVLLMError(
            f"slora-plugin: vLLM's {what} lacks instance attribute(s) {missing} "
            f"(written for vLLM {SUPPORTED_VLLM})")
