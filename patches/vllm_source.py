"""vLLM names looked up in its *source*, parsed with `ast`, never imported.

Two users: `port_check` runs the guard against any vLLM release (a wheel or an unpacked tree)
without installing it (importing a newer vLLM needs its own torch), and `guard` checks the
instance attributes patches read (`self.x = ...` in vLLM's `__init__`, invisible on the class)
in the installed vLLM's source at start.

What it follows, as Python would at import time: module-level definitions and assignments
(inside `if`/`try` too, the last one wins), `import`/`from ... import` (relative ones included)
into other vLLM modules and packages, class members and then the bases a class names (those
defined in vLLM; `torch.nn.Module` and the like are outside and end the search), attributes of
a module-level instance (`Registry = _Registry()`), and fields of dataclass-like classes.
"""

from __future__ import annotations

import ast
import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

#: Top-level packages looked up in the source (everything else is "outside").
ROOT_PACKAGE = "vllm"


class SourceTree:
    """The `.py` files of a vLLM release: a wheel (read in place) or a folder holding `vllm/`
    (an unpacked wheel, a site-packages, a checkout). A folder that *is* the `vllm` package
    is accepted too."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._zip: zipfile.ZipFile | None = None
        if os.path.isfile(location) and zipfile.is_zipfile(location):
            self._zip = zipfile.ZipFile(location)
            self._names = set(self._zip.namelist())
            self.root = ""
        elif os.path.isdir(os.path.join(location, ROOT_PACKAGE)):
            self.root = location
        elif os.path.isdir(location) and \
                os.path.basename(os.path.abspath(location)) == ROOT_PACKAGE:
            self.root = os.path.dirname(os.path.abspath(location))
        else:
            raise FileNotFoundError(
                f"{location}: neither a wheel nor a folder holding {ROOT_PACKAGE}/")
        self._modules: dict[str, Module | None] = {}

    def _read(self, rel: str) -> str | None:
        if self._zip is not None:
            return self._zip.read(rel).decode("utf-8") if rel in self._names else None
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def version(self) -> str:
        """The release's version, from `vllm/_version.py` (written by the wheel build)."""
        mod = self.module(f"{ROOT_PACKAGE}._version")
        if mod is not None:
            for name in ("__version__", "version"):
                node = mod.scope.get(name)
                if isinstance(node, _Value) and isinstance(node.value, ast.Constant):
                    return str(node.value.value)
        return "unknown"

    def module(self, name: str) -> Module | None:
        """The parsed module `name` (a package is its `__init__.py`), None if absent."""
        if name not in self._modules:
            rel = name.replace(".", "/")
            self._modules[name] = None
            for candidate, is_package in ((f"{rel}.py", False), (f"{rel}/__init__.py", True)):
                text = self._read(candidate)
                if text is not None:
                    self._modules[name] = Module(self, name, ast.parse(text, candidate), is_package)
                    break
        return self._modules[name]

    def is_package(self, name: str) -> bool:
        mod = self.module(name)
        return mod is not None and mod.is_package


@dataclass
class _Value:
    """A module- or class-level assignment (`value` None: annotation only, e.g. a field)."""

    value: ast.expr | None
    annotation: ast.expr | None = None


@dataclass
class _Imported:
    """A name bound by an import: module `module`, then attribute `attribute` (if any)."""

    module: str
    attribute: str | None


@dataclass
class Found:
    """What a target names: a function, a class, a value, or a module."""

    node: ast.AST | None  # FunctionDef, ClassDef, the assigned expression (None: a field)
    module: Module
    kind: str = "value"  # function | class | value | module


class Module:
    def __init__(self, tree: SourceTree, name: str, node: ast.Module, is_package: bool) -> None:
        self.tree, self.name, self.node, self.is_package = tree, name, node, is_package
        self.scope: dict[str, ast.AST | _Value | _Imported] = {}
        for stmt in _flat(node.body):
            self._bind(stmt)

    def _bind(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.scope[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in _names(target):
                    self.scope[name] = _Value(stmt.value)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            self.scope[stmt.target.id] = _Value(stmt.value, stmt.annotation)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname:
                    self.scope[alias.asname] = _Imported(alias.name, None)
                else:
                    top = alias.name.split(".")[0]
                    self.scope[top] = _Imported(top, None)
        elif isinstance(stmt, ast.ImportFrom):
            base = self._absolute(stmt)
            for alias in stmt.names:
                if alias.name != "*":
                    self.scope[alias.asname or alias.name] = _Imported(base, alias.name)

    def _absolute(self, stmt: ast.ImportFrom) -> str:
        if not stmt.level:
            return stmt.module or ""
        parts = self.name.split(".")
        keep = len(parts) - stmt.level + (1 if self.is_package else 0)
        return ".".join(parts[:keep] + ([stmt.module] if stmt.module else []))


def _flat(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a block, with the bodies of `if`/`try`/`with` inlined (all branches)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            yield from _flat(stmt.body)
            yield from _flat(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _flat(stmt.body)
            for handler in stmt.handlers:
                yield from _flat(handler.body)
            yield from _flat(stmt.orelse)
            yield from _flat(stmt.finalbody)
        elif isinstance(stmt, ast.With):
            yield from _flat(stmt.body)
        else:
            yield stmt


def _names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _names(elt)]
    return []


@dataclass
class SourceLookup:
    """Resolves guard targets ("package.module:Qualified.name") in a `SourceTree`."""

    tree: SourceTree
    _depth: int = field(default=0, repr=False)

    def find(self, target: str) -> Found | str:
        """What `target` names, or a one-line reason why it cannot be found."""
        module_name, _, qualname = target.partition(":")
        mod = self.tree.module(module_name)
        if mod is None:
            return f"module {module_name} does not exist"
        found: Found = Found(None, mod, kind="module")
        for part in qualname.split(".") if qualname else ():
            nxt = self.member(found, part)
            if nxt is None:
                return f"{part!r} is missing"
            found = nxt
        return found

    # ------------------------------------------------------------------ members
    def member(self, found: Found, name: str) -> Found | None:
        if found.kind == "module":
            return self._in_module(found.module, name)
        if found.kind == "class":
            return self._in_class(found.module, found.node, name)  # type: ignore[arg-type]
        if found.kind == "value" and isinstance(found.node, ast.Call):
            # an instance made at module level: its class's members
            cls = self._expr(found.module, found.node.func)
            if cls is not None and cls.kind == "class":
                return self._in_class(cls.module, cls.node, name)  # type: ignore[arg-type]
        return None

    def _in_module(self, mod: Module, name: str) -> Found | None:
        bound = mod.scope.get(name)
        if bound is None:
            sub = f"{mod.name}.{name}"
            if mod.is_package and self.tree.module(sub) is not None:
                return Found(None, self.tree.module(sub), kind="module")  # type: ignore[arg-type]
            return None
        return self._bound(mod, bound)

    def _bound(self, mod: Module, bound: ast.AST | _Value | _Imported) -> Found | None:
        if isinstance(bound, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return Found(bound, mod, kind="function")
        if isinstance(bound, ast.ClassDef):
            return Found(bound, mod, kind="class")
        if isinstance(bound, _Imported):
            return self._imported(bound)
        assert isinstance(bound, _Value)
        if isinstance(bound.value, (ast.Name, ast.Attribute)):
            alias = self._expr(mod, bound.value)  # X = Y: what Y is
            if alias is not None:
                return alias
        return Found(bound.value, mod)

    def _imported(self, imp: _Imported) -> Found | None:
        if not imp.module.split(".")[0] == ROOT_PACKAGE:
            return None  # outside vLLM: not followed
        if self._depth > 50:
            return None  # an import cycle
        mod = self.tree.module(imp.module)
        if mod is None:
            return None
        if imp.attribute is None:
            return Found(None, mod, kind="module")
        self._depth += 1
        try:
            return self._in_module(mod, imp.attribute)
        finally:
            self._depth -= 1

    def _expr(self, mod: Module, expr: ast.expr) -> Found | None:
        """What a `Name` or `a.b.c` expression in `mod` refers to (None: outside vLLM)."""
        if isinstance(expr, ast.Name):
            bound = mod.scope.get(expr.id)
            return self._bound(mod, bound) if bound is not None else None
        if isinstance(expr, ast.Attribute):
            base = self._expr(mod, expr.value)
            return self.member(base, expr.attr) if base is not None else None
        if isinstance(expr, ast.Subscript):  # Generic[T], Base[int]
            return self._expr(mod, expr.value)
        return None

    def _in_class(self, mod: Module, cls: ast.ClassDef, name: str) -> Found | None:
        for klass, kmod in self.mro(mod, cls):
            member = None
            for stmt in _flat(klass.body):
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                        stmt.name == name:
                    member = Found(stmt, kmod,
                                   "class" if isinstance(stmt, ast.ClassDef) else "function")
                elif isinstance(stmt, ast.Assign) and \
                        name in [n for t in stmt.targets for n in _names(t)]:
                    member = Found(stmt.value, kmod)
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                        stmt.target.id == name:
                    member = Found(stmt.value, kmod)
            if member is not None:
                return member
            if name == "__dataclass_fields__" and any("dataclass" in ast.unparse(d)
                                                       for d in klass.decorator_list):
                return Found(None, kmod)
        return None

    def mro(self, mod: Module, cls: ast.ClassDef) -> list[tuple[ast.ClassDef, Module]]:
        """The class and its vLLM bases, depth first, each once (close enough to C3 for
        finding where a name is defined in single-inheritance-heavy code)."""
        order: list[tuple[ast.ClassDef, Module]] = []
        seen: set[int] = set()

        def visit(c: ast.ClassDef, m: Module) -> None:
            if id(c) in seen:
                return
            seen.add(id(c))
            order.append((c, m))
            for base in c.bases:
                found = self._expr(m, base)
                if found is not None and found.kind == "class":
                    visit(found.node, found.module)  # type: ignore[arg-type]

        visit(cls, mod)
        return order

    # ------------------------------------------------------------------ what a class offers
    def instance_attributes(self, found: Found) -> set[str]:
        """Names a class (or its vLLM bases) assigns on `self` in any method, plus its class
        members: what `hasattr(instance, name)` can be true for after construction."""
        assert found.kind == "class"
        names: set[str] = set()
        for klass, _ in self.mro(found.module, found.node):  # type: ignore[arg-type]
            for stmt in _flat(klass.body):
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(stmt.name)
                elif isinstance(stmt, ast.Assign):
                    names.update(n for t in stmt.targets for n in _names(t))
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
            for node in ast.walk(klass):
                targets: list[ast.expr] = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                    targets = [node.target]
                for t in targets:
                    for elt in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                        if isinstance(elt, ast.Attribute) and isinstance(elt.value, ast.Name) \
                                and elt.value.id == "self":
                            names.add(elt.attr)
        return names

    def callable_node(
            self, found: Found) -> ast.FunctionDef | ast.AsyncFunctionDef | list[ast.AnnAssign] | None:
        """The function whose parameters a call to `found` takes: the function itself, a
        class's `__init__` (its own or a vLLM base's), or, for a class without one, its
        annotated fields (dataclass, msgspec.Struct, pydantic config). None: unreadable."""
        if found.kind == "function":
            return found.node  # type: ignore[return-value]
        if found.kind != "class":
            return None
        init = self._in_class(found.module, found.node, "__init__")  # type: ignore[arg-type]
        if init is not None and init.kind == "function":
            return init.node  # type: ignore[return-value]
        fields: list[ast.AnnAssign] = []
        for klass, _ in reversed(self.mro(found.module, found.node)):  # type: ignore[arg-type]
            for stmt in _flat(klass.body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                        "ClassVar" not in ast.unparse(stmt.annotation):
                    name = stmt.target.id
                    fields = [f for f in fields if ast.unparse(f.target) != name] + [stmt]
        return fields
