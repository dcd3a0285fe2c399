"""`adapters check` reports directory symlinks it skips (they lead outside the directory) and
shows progress on stderr for long checks."""

from __future__ import annotations

import os

from slora_plugin import cli
from slora_plugin.adapters.cli import CHECK_PROGRESS_MIN
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import write_random_adapter

TARGETS = ["q_proj", "v_proj"]


def test_symlink_leaving_the_directory_is_a_reported_row(tmp_path, tiny_dims, capsys):
    root = tmp_path / "adapters"
    write_random_adapter(str(root / "good"), tiny_dims, 4, TARGETS)
    write_random_adapter(str(tmp_path / "elsewhere" / "a"), tiny_dims, 4, TARGETS)
    os.makedirs(root / "org")
    os.symlink(tmp_path / "elsewhere" / "a", root / "org" / "escaped")
    os.symlink(root / "good", root / "alias")  # inside: served, not reported

    index = AdapterIndex(str(root))
    assert index.scan() == ["alias", "good"]
    assert [e.adapter for e in index.skipped] == ["org/escaped"]

    assert cli.main(["adapters", "check", str(root)]) == 1
    out, err = capsys.readouterr()
    row = [line for line in out.splitlines() if line.startswith("org/escaped")]
    assert len(row) == 1 and "symlink that leads outside" in row[0]
    assert str(tmp_path / "elsewhere" / "a") in row[0]
    assert "3 adapters checked" in err and "1 with problems" in err


def test_long_check_shows_progress_on_stderr(tmp_path, tiny_dims, capsys):
    root = tmp_path / "many"
    for i in range(CHECK_PROGRESS_MIN):
        write_random_adapter(str(root / f"a{i:02d}"), tiny_dims, 4, TARGETS)
    assert cli.main(["adapters", "check", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "checking adapters" in err and f"{CHECK_PROGRESS_MIN}/{CHECK_PROGRESS_MIN}" in err
    assert "checking adapters" not in out

    small = tmp_path / "few"
    write_random_adapter(str(small / "one"), tiny_dims, 4, TARGETS)
    assert cli.main(["adapters", "check", str(small)]) == 0
    assert "checking adapters" not in capsys.readouterr().err
