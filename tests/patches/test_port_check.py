"""The port check: the guard's declarations checked on vLLM *source* (parsed, not imported),
here on a small fake vLLM written by the test, and on the installed vLLM's own files."""

from __future__ import annotations

import os
import textwrap
import zipfile
from pathlib import Path

import pytest

from slora_plugin.patches import catalogue, guard, port_check
from slora_plugin.patches.guard import InstanceAttributes, Overrides, Requires
from slora_plugin.patches.vllm_source import SourceTree

FILES = {
    "vllm/__init__.py": "",
    "vllm/_version.py": "__version__ = version = '9.9.9'\n",
    "vllm/base.py": """
        import torch

        class Base(torch.nn.Module):
            def __init__(self):
                self.waiting = []
                self.running, self.log_stats = [], False

            def _preempt_request(self, request, timestamp, drop_stale_output=False):
                pass
        """,
    "vllm/sched/__init__.py": "from .impl import Scheduler\n",
    "vllm/sched/impl.py": """
        from dataclasses import dataclass, field
        from typing import ClassVar

        from vllm.base import Base as _Base
        from ..policy import Policy

        try:
            from vllm.fast import helper
        except ImportError:
            def helper(x, *, y=Policy.FCFS):
                pass

        class Scheduler(_Base):
            def schedule(self, throttle_prefills=False, budget=None):
                pass

            def add(self, request, prio=Policy.FCFS, registry=REGISTRY):
                pass

        @dataclass
        class Cfg:
            a: int
            b: str = "x"
            counter: ClassVar[int] = 0

        class _Registry:
            resolvers: dict = field(default_factory=dict)

            def register(self, name, resolver):
                pass

        Registry = _Registry()
        Alias = Scheduler
        """,
    "vllm/policy.py": """
        import enum

        class Policy(enum.Enum):
            FCFS = "fcfs"
        """,
}


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    for rel, text in FILES.items():
        path = tmp_path / "src" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "src"


def _problems(location, *decls):
    lookup = port_check.SourceChecks(SourceTree(str(location)))
    return [p for d in decls for p in d.check(lookup)]


def test_names_are_followed_through_imports_bases_instances_and_aliases(fake_tree):
    assert _problems(
        fake_tree,
        Requires("vllm.sched:Scheduler._preempt_request", ("request", "drop_stale_output")),
        Requires("vllm.sched.impl:Alias.schedule", ("budget",)),
        Requires("vllm.sched.impl:Cfg", ("a", "b")),
        Requires("vllm.sched.impl:Cfg.__dataclass_fields__"),
        Requires("vllm.sched.impl:Registry.resolvers"),
        Requires("vllm.sched.impl:Registry.register", ("name", "resolver")),
        Requires("vllm.sched.impl:helper", ("x", "y")),
        Requires("vllm.policy:Policy.FCFS"),
        Requires("vllm.sched:impl"),
        InstanceAttributes("vllm.sched:Scheduler", ("waiting", "running", "log_stats", "add")),
    ) == []


def test_what_is_missing_is_named(fake_tree):
    texts = [p.text for p in _problems(
        fake_tree,
        Requires("vllm.gone:Thing"),
        Requires("vllm.sched:Scheduler.vanished"),
        Requires("vllm.sched.impl:Cfg", ("a", "counter")),
        InstanceAttributes("vllm.sched:Scheduler", ("waiting", "skipped_waiting")),
        Requires("vllm.base:torch.nn.Module"),  # outside vLLM: never followed
    )]
    assert texts == [
        "vllm.gone:Thing: module vllm.gone does not exist",
        "vllm.sched:Scheduler.vanished: 'vanished' is missing",
        "vllm.sched.impl:Cfg: parameter(s) ['counter'] missing (has ['a', 'b'])",
        "vllm.sched:Scheduler: instance attribute(s) ['skipped_waiting'] never set",
        "vllm.base:torch.nn.Module: 'torch' is missing",
    ]


def test_signatures_from_source_match_the_recorded_form(fake_tree):
    problems = _problems(
        fake_tree,
        Overrides("vllm.sched:Scheduler.add", "(self, request, prio=Policy.FCFS, registry=REGISTRY)",
                  "ours", "(self, *args, **kwargs)"),
        Overrides("vllm.sched.impl:helper", "(x, *, y=Policy.FCFS)", "ours", "(x, *, y=Policy.FCFS)"))
    assert problems == []


def test_changed_overrides_are_breaks_or_checks(fake_tree):
    problems = _problems(
        fake_tree,
        Overrides("vllm.sched:Scheduler._preempt_request", "(self, request, timestamp)",
                  "pool:Ours._preempt_request", "(self, request, timestamp)"),
        Overrides("vllm.sched:Scheduler.schedule", "(self, throttle_prefills=False)",
                  "pool:Ours.schedule", "(self, *args, **kwargs)"))
    assert [p.untested for p in problems] == [False, True]
    assert problems[0].text.endswith("cannot take: drop_stale_output at position 2; "
                                     "drop_stale_output by name")
    assert "found (self, throttle_prefills=False, budget=None)" in problems[1].text


def test_a_wheel_is_read_in_place(fake_tree, tmp_path):
    wheel = tmp_path / "vllm-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for rel in FILES:
            z.write(fake_tree / rel, rel)
    tree = SourceTree(str(wheel))
    assert tree.version() == "9.9.9"
    assert _problems(wheel, Requires("vllm.sched:Scheduler._preempt_request", ("timestamp",))) == []
    assert SourceTree(str(fake_tree / "vllm")).version() == "9.9.9"  # the package folder itself
    with pytest.raises(FileNotFoundError):
        SourceTree(str(tmp_path / "nothing"))


def test_the_report_on_a_release_missing_everything(fake_tree, tmp_path, capsys):
    out = tmp_path / "report.md"
    assert port_check.main([str(fake_tree), "--output", str(out)]) == 1
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert text.startswith("# Port check: slora-plugin patches against vLLM 9.9.9\n")
    assert f"{len(catalogue.PATCHES)} of {len(catalogue.PATCHES)} patches would break." in text
    for p in catalogue.PATCHES:
        assert f"| {p.module} | BREAKS |" in text and f"## {p.module} (BREAKS)" in text
    assert port_check.main([str(tmp_path / "nothing")]) == 2


def test_the_installed_vllm_source_reports_nothing(capsys):
    """The source check agrees with the import check on the vLLM the plugin is written for."""
    import vllm

    site = os.path.dirname(os.path.dirname(os.path.abspath(vllm.__file__)))
    version, reports = port_check.check(site)
    assert version == guard.SUPPORTED_VLLM
    assert {r.patch.module: [p.text for p in r.problems] for r in reports} == \
        {p.module: [] for p in catalogue.PATCHES}
    text = port_check.render_report(site, version, reports, "2026-12-05")
    assert "Nothing would break." in text and "| scheduler | ok | 0 |" in text
