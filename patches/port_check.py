"""The guard, run against the source of any vLLM release without installing it.

    python -m slora_plugin.patches.port_check WHEEL_OR_DIR [--output REPORT.md]

WHEEL_OR_DIR is a wheel (`pip download vllm==X --no-deps`, read in place) or a folder holding
`vllm/` (an unpacked wheel, a site-packages, a source checkout). Every declaration of every
patch in the catalogue (`REQUIRES`: names, parameters, full signatures of what we override, and
the instance attributes we read) is checked on the parsed source (`vllm_source.py`), and the
report says, per patch, what would break: a missing name stops the engine, a changed signature
our override cannot take would crash it mid-step, and a changed signature it accepts needs a
look (a new parameter our override forwards, a changed default it hard-codes). Exit status 0
when nothing would break, 1 otherwise.

It is a module of `patches/`, not a `slora-plugin` subcommand: it is a porting tool for whoever
maintains the plugin, reads nothing but the patch declarations beside it, and runs in the
project's environment (importing the patch modules needs the supported vLLM installed, not the
one checked: importing a newer vLLM would need its own torch).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import sys
from dataclasses import dataclass

from slora_plugin.patches import catalogue, guard
from slora_plugin.patches.vllm_source import SourceLookup, SourceTree


class SourceChecks:
    """`guard.Lookup` over parsed source."""

    def __init__(self, tree: SourceTree) -> None:
        self.source = SourceLookup(tree)

    def exists(self, target: str) -> str | None:
        found = self.source.find(target)
        return found if isinstance(found, str) else None

    def params(self, target: str) -> tuple[guard.Param, ...] | str:
        found = self.source.find(target)
        if isinstance(found, str):
            return found
        node = self.source.callable_node(found)
        if node is None:
            return f"signature cannot be read (a {found.kind}, not a function or class)"
        if isinstance(node, list):  # the fields of a dataclass-like class
            return tuple(guard.Param(ast.unparse(f.target), "POSITIONAL_OR_KEYWORD",
                                     None if f.value is None else ast.unparse(f.value))
                         for f in node)
        return guard.params_of_node(node)

    def instance_attributes(self, target: str) -> set[str] | str:
        found = self.source.find(target)
        if isinstance(found, str):
            return found
        if found.kind != "class":
            return f"not a class (a {found.kind})"
        return self.source.instance_attributes(found)


@dataclass
class PatchReport:
    patch: catalogue.Patch
    problems: list[guard.Problem]

    @property
    def status(self) -> str:
        if any(not p.untested for p in self.problems):
            return "BREAKS"
        return "check" if self.problems else "ok"


def check(location: str) -> tuple[str, list[PatchReport]]:
    """The release's version and, per patch, its unmet requirements there."""
    tree = SourceTree(location)
    lookup = SourceChecks(tree)
    reports = []
    for patch, module in zip(catalogue.PATCHES, catalogue.patch_modules()):
        found: list[guard.Problem] = []
        for decl in module.REQUIRES:
            found += decl.check(lookup)
        reports.append(PatchReport(patch, found))
    return tree.version(), reports


def render_report(location: str, version: str, reports: list[PatchReport], today: str) -> str:
    broken = [r for r in reports if r.status == "BREAKS"]
    lines = [
        f"# Port check: slora-plugin patches against vLLM {version}",
        "",
        f"Date: {today}. Source: `{os.path.basename(os.path.normpath(location))}` (parsed, not "
        f"installed). The plugin is written for vLLM {guard.SUPPORTED_VLLM}. Produced by "
        f"`python -m slora_plugin.patches.port_check`.",
        "",
        ("Nothing would break." if not broken else
         f"{len(broken)} of {len(reports)} patches would break."),
        "",
        "BREAKS: a name is missing or vLLM would call our override with something it cannot "
        "take. check: a signature we override changed, but our override accepts it (read the "
        "change: a new parameter may need handling, a changed default may be hard-coded in "
        "ours). ok: every declared name, parameter and signature is as written against.",
        "",
        "| patch | status | problems | upstream change that would remove the patch |",
        "|---|---|---|---|",
    ]
    for r in reports:
        lines.append(f"| {r.patch.module} | {r.status} | {len(r.problems)} "
                     f"| {r.patch.removed_by} |")
    for r in reports:
        if not r.problems:
            continue
        lines += ["", f"## {r.patch.module} ({r.status})", "", f"{r.patch.what}.", ""]
        for p in r.problems:
            lines.append(f"- {'check' if p.untested else 'BREAKS'}: {p.text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slora_plugin.patches.port_check",
        description="Check the plugin's patches against a vLLM wheel or source tree "
                    "(not installed); exit 1 if something would break.")
    parser.add_argument("location", help="a vLLM wheel, or a folder holding vllm/")
    parser.add_argument("--output", help="also write the report (Markdown) to this file")
    args = parser.parse_args(argv)
    try:
        version, reports = check(args.location)
    except FileNotFoundError as e:
        print(f"port_check: {e}", file=sys.stderr)
        return 2
    text = render_report(args.location, version, reports, datetime.date.today().isoformat())
    print(text, end="")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 1 if any(r.status == "BREAKS" for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
