"""One fleet writer for `adapters synth` and the throughput harness: both layouts write the same
adapters, and the two callers agree wherever their arguments mean the same fleet."""

from __future__ import annotations

import os

import pytest

from slora_plugin.adapters.cli import synthesize
from slora_plugin.adapters.fleet import FleetAdapter, FleetError, write_fleet
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from slora_plugin.bench.run import adapter_name, prepare_adapters
from slora_plugin.model_config import load_model_config

TARGETS = ["q_proj", "down_proj"]


def _read(directory: str, name: str) -> tuple[bytes, bytes, int]:
    """(config bytes, weights bytes, weights inode) of one adapter."""
    path = os.path.join(directory, name)
    with open(os.path.join(path, CONFIG_NAME), "rb") as f:
        cfg = f.read()
    with open(os.path.join(path, WEIGHTS_NAME), "rb") as f:
        weights = f.read()
    return cfg, weights, os.stat(os.path.join(path, WEIGHTS_NAME)).st_ino


def _sharing(directory: str, names: list[str]) -> list[list[str]]:
    """The adapters grouped by the weights file they share (hard links), in order."""
    by_inode: dict[int, list[str]] = {}
    for n in names:
        by_inode.setdefault(_read(directory, n)[2], []).append(n)
    return sorted(by_inode.values())


def test_both_layouts_write_the_same_adapters(tmp_path, tiny_dims):
    fleet = [FleetAdapter(f"a{i}", r, seed=100 + i, group=f"r{r}-v{i // 2 % 2}")
             for i, r in enumerate([4, 8, 4, 8, 4, 8, 4])]
    in_place = write_fleet(str(tmp_path / "in-place"), fleet, tiny_dims, TARGETS)
    linked = write_fleet(str(tmp_path / "linked"), fleet, tiny_dims, TARGETS, files_dir=str(tmp_path / "files"))
    assert in_place == linked == [a.name for a in fleet]
    for n in in_place:
        assert _read(str(tmp_path / "in-place"), n)[:2] == _read(str(tmp_path / "linked"), n)[:2], n
    assert _sharing(str(tmp_path / "in-place"), in_place) == _sharing(str(tmp_path / "linked"), linked) == [
        ["a0", "a4"], ["a1", "a5"], ["a2", "a6"], ["a3"]]
    # in place, each adapter keeps its own config file; linked, both files are the group's
    cfg_inodes = {os.stat(tmp_path / "in-place" / n / CONFIG_NAME).st_ino for n in in_place}
    assert len(cfg_inodes) == len(fleet)
    assert sorted(os.listdir(tmp_path / "files")) == ["r4-v0", "r4-v1", "r8-v0", "r8-v1"]
    assert (os.stat(tmp_path / "linked" / "a0" / CONFIG_NAME).st_ino
            == os.stat(tmp_path / "files" / "r4-v0" / CONFIG_NAME).st_ino)


def test_synth_and_harness_write_the_same_fleet(tmp_path, tiny_dims, tiny_model_dir):
    """Where their arguments overlap (names adapter-NNNNN, rank mix in turn, `distinct` files per
    rank), `adapters synth` and the harness's prepare_adapters write the same adapters: names,
    configs and which adapters share a weights file. The weights differ only by the seeds each
    caller has always used (synth: seed * 1_000_003 + the first adapter's index; the harness:
    1000 * rank + variant)."""
    count, ranks, distinct = 17, [4, 8, 16], 2
    synth_dir = str(tmp_path / "synth")
    names = synthesize(synth_dir, count, ranks, tiny_dims, TARGETS, distinct=distinct, seed=7)
    plan = {g: (ranks[g % len(ranks)], g // len(ranks)) for g in range(count)}
    bench_dir = prepare_adapters(str(tmp_path / "bench"), plan, load_model_config(tiny_model_dir), TARGETS,
                                 distinct)
    assert names == [adapter_name(g) for g in range(count)] == sorted(os.listdir(bench_dir))
    assert AdapterIndex(synth_dir).scan() == AdapterIndex(bench_dir).scan() == names
    for n in names:
        assert _read(synth_dir, n)[0] == _read(bench_dir, n)[0], n
    assert _sharing(synth_dir, names) == _sharing(bench_dir, names)
    assert len(_sharing(synth_dir, names)) == len(ranks) * distinct


def test_harness_layout_keeps_what_exists_and_checks_the_rank(tmp_path, tiny_dims):
    files = str(tmp_path / "files")
    fleet = [FleetAdapter("a", 4, seed=1, group="g4"), FleetAdapter("b", 4, seed=1, group="g4")]
    write_fleet(str(tmp_path / "fleet"), fleet, tiny_dims, TARGETS, files_dir=files)
    before = os.stat(tmp_path / "files" / "g4" / WEIGHTS_NAME).st_mtime_ns
    write_fleet(str(tmp_path / "fleet"), fleet, tiny_dims, TARGETS, files_dir=files)
    assert os.stat(tmp_path / "files" / "g4" / WEIGHTS_NAME).st_mtime_ns == before
    with pytest.raises(FleetError, match=r"fleet/a has rank 4, this run needs 8$"):
        write_fleet(str(tmp_path / "fleet"), [FleetAdapter("a", 8, seed=1, group="g8")], tiny_dims, TARGETS,
                    files_dir=files)
    with pytest.raises(FleetError, match="adapter c: no group"):
        write_fleet(str(tmp_path / "fleet"), [FleetAdapter("c", 4, seed=1)], tiny_dims, TARGETS, files_dir=files)


def test_a_group_has_one_rank(tmp_path, tiny_dims):
    with pytest.raises(FleetError, match="group g: adapter a has rank 4, b rank 8"):
        write_fleet(str(tmp_path), [FleetAdapter("a", 4, 0, "g"), FleetAdapter("b", 8, 0, "g")], tiny_dims,
                    TARGETS)
    assert not os.listdir(tmp_path)

