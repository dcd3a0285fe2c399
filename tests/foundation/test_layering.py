"""The package's rooms, checked on the imports of every module (parsed, never imported).

Rooms (`ROOMS` below is the one table of them):

- core: what the plugin *is* -- page layout, the raw adapter format, settings, the kernels, the
  adapter store, the page pool and its pure logic (and `compress/`, `train/` once they exist).
  It imports nothing of vLLM, and of this package only other core modules, so that it can be
  tested, benchmarked and reused without an engine, and survives a vLLM port untouched.
- patches: every touch of vLLM's own classes and private names. It depends on vLLM and the core
  only: the glue's classes are passed in by the caller or named by a dotted string (as
  `WORKER_CLS` and `SCHEDULER_CLS` are), never imported, so that the guard and the port check
  can read every patch without loading the engine glue.
- glue (everything else: `pool/scheduler.py`, `worker/`, `adapters/resolver.py`, the CLI and the
  throughput harness): vLLM subclasses and entry points; no rule beyond the two above.

Every import counts, including those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: room -> (module patterns in it, module patterns excluded from it), matched with fnmatch on
#: dotted names (`kernels/` and `patches/` are `slora_plugin.kernels` / `slora_plugin.patches`).
ROOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "core": (
        ("slora_plugin.layout", "slora_plugin.core_layout", "slora_plugin.model_config",
         "slora_plugin.tp_shard",
         "slora_plugin.roofline", "slora_plugin.raw_format", "slora_plugin.config",
         "slora_plugin.kernels.*", "slora_plugin.adapters", "slora_plugin.adapters.*",
         "slora_plugin.pool", "slora_plugin.pool.*", "slora_plugin.compress",
         "slora_plugin.compress.*", "slora_plugin.train", "slora_plugin.train.*",
         # the worker's vLLM-free parts (its subclasses of vLLM classes are glue)
         "slora_plugin.worker.adapter_copies", "slora_plugin.worker.compressed_bases",
         "slora_plugin.worker.scope",
         "slora_plugin.worker.page_loader", "slora_plugin.worker.tables",
         "slora_plugin.worker.threads"),
        # vLLM glue living beside core modules: the resolver is a vLLM `LoRAResolver`, the
        # scheduler module holds vLLM's Scheduler/KVCacheManager subclasses.
        ("slora_plugin.adapters.resolver", "slora_plugin.pool.scheduler"),
    ),
    "patches": (("slora_plugin.patches.*",), ()),
}
#: What each room must not import (module patterns; a pattern also covers its submodules).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("vllm",),
    "patches": ("slora_plugin.pool", "slora_plugin.worker", "slora_plugin.bench",
                "slora_plugin.bench_*"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "patches"):
        parts.insert(0, "slora_plugin")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    files = [*(ROOT / "slora_plugin").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"),
             *(ROOT / "patches").rglob("*.py")]
    return {module_name(p): p for p in sorted(files)}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved against `name`)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from pkg import sub` may import the submodule pkg.sub
            found.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
    return found


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def room_of(name: str) -> str | None:
    for room, (members, excluded) in ROOMS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in members) and \
                not any(fnmatch.fnmatchcase(name, p) for p in excluded):
            return room
    return None


MODULES = all_modules()


def test_the_rooms_are_populated():
    """The patterns still name real modules (a rename must not empty a room silently)."""
    rooms = {name: room_of(name) for name in MODULES}
    for name in ("slora_plugin.layout", "slora_plugin.raw_format", "slora_plugin.config",
                 "slora_plugin.pool.page_pool", "slora_plugin.adapters.store",
                 "slora_plugin.kernels.lora_linear"):
        assert rooms[name] == "core", name
    assert rooms["slora_plugin.patches.guard"] == "patches"
    for name in ("slora_plugin.pool.scheduler", "slora_plugin.adapters.resolver",
                 "slora_plugin.worker.worker"):
        assert rooms[name] is None, name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if room_of(n) is not None))
def test_module_stays_in_its_room(name):
    room = room_of(name)
    imported = imports_of(MODULES[name], name)
    bad = sorted(m for m in imported if matches(m, FORBIDDEN[room]))
    if room == "core":
        # a core module may use this package's core only (anything else brings vLLM with it)
        bad += sorted(m for m in imported if m.startswith("slora_plugin.") and m in MODULES
                      and room_of(m) != "core")
    assert not bad, f"{name} ({room}) imports {bad}"


def test_imports_are_found_inside_functions(tmp_path):
    """The parser sees lazy and relative imports (what the rule is checked with)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vllm.config import X\n    from . import sibling\n")
    assert {"vllm.config", "vllm.config.X", "pkg.sibling"} <= imports_of(f, "pkg.m")
