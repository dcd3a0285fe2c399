"""Names: confined to the directory, nested names, stable ids, the HF cache, vLLM's resolver,
and the `adapters` CLI."""

from __future__ import annotations

import argparse
import asyncio
import os

import pytest
import torch

from slora_plugin.adapters import AdapterError, AdapterNotFoundError, AdapterStore
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import CONFIG_NAME, write_random_adapter
from slora_plugin.adapters.sources import AdapterSources

TARGETS = ["q_proj", "v_proj"]


def test_names_cannot_escape_the_directory(tmp_path, tiny_dims):
    root = tmp_path / "adapters"
    write_random_adapter(str(tmp_path / "outside"), tiny_dims, 4, TARGETS)
    write_random_adapter(str(root / "org" / "inside"), tiny_dims, 4, TARGETS)
    os.symlink(tmp_path / "outside", root / "link-out")
    os.symlink(root / "org" / "inside", root / "link-in")
    os.makedirs(root / "cfg-out")
    os.symlink(tmp_path / "outside" / CONFIG_NAME, root / "cfg-out" / CONFIG_NAME)
    index = AdapterIndex(str(root))
    for name in ("../outside", "org/../../outside", "/etc", "", "org//inside", "./org/inside",
                 "link-out", "cfg-out", ".slora-ids"):
        with pytest.raises(AdapterError) as e:
            index.locate(name)
        assert not isinstance(e.value, AdapterNotFoundError) and e.value.reason
    assert index.locate("org/inside") == index.locate("link-in")
    assert index.scan() == ["cfg-out", "link-in", "org/inside"]  # link-out is never listed


def test_scan_reads_no_file_and_new_adapters_are_found(tmp_path, tiny_dims, monkeypatch):
    for i in range(5):
        write_random_adapter(str(tmp_path / f"team{i % 2}" / f"a{i}"), tiny_dims, 4, TARGETS)
    import builtins
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    index = AdapterIndex(str(tmp_path))
    assert index.scan() == ["team0/a0", "team0/a2", "team0/a4", "team1/a1", "team1/a3"]
    assert not opened
    monkeypatch.setattr(builtins, "open", real_open)
    write_random_adapter(str(tmp_path / "late"), tiny_dims, 4, TARGETS)
    assert index.locate("late").endswith("late")


def test_lora_int_ids_are_stable_and_persistent(tmp_path):
    a = AdapterSources(str(tmp_path))
    ids = [a.lora_int_id(n) for n in ("x", "org/y", "x", "z")]
    assert ids == [1, 2, 1, 3]
    b = AdapterSources(str(tmp_path))  # a restart, or another process
    assert [b.lora_int_id(n) for n in ("z", "org/y", "new")] == [3, 2, 4]
    assert a.lora_int_id("new") == 4


def _hf_cache(cache: str, repo: str, dims) -> str:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(sha)
    return write_random_adapter(os.path.join(base, "snapshots", sha), dims, 4, TARGETS)


def test_hub_ids_are_served_from_the_local_hf_cache(tmp_path, tiny_dims, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf")
    snap = _hf_cache(cache, "someorg/tiny-lora", tiny_dims)
    os.makedirs(tmp_path / "dir")
    with AdapterStore(tiny_dims, 512, torch.float16, adapter_dir=str(tmp_path / "dir"), max_rank=8,
                      host_cache_bytes=1 << 20, loader_threads=1, hf_cache_dir=cache) as store:
        assert store.locate("someorg/tiny-lora")[1] == os.path.realpath(snap)
        with store.get("someorg/tiny-lora") as lease:
            assert lease.spec.ranks == {"q_proj": 4, "v_proj": 4}
        with pytest.raises(AdapterNotFoundError):
            store.spec("someorg/not-cached")
        # the directory wins over the cache for the same name
        write_random_adapter(str(tmp_path / "dir" / "someorg" / "tiny-lora"), tiny_dims, 2, TARGETS)
        assert store.spec("someorg/tiny-lora").ranks == {"q_proj": 2, "v_proj": 2}


def test_vllm_resolver_and_lora_request(tmp_path, tiny_dims):
    from vllm.lora.resolver import LoRAResolverRegistry

    from slora_plugin.adapters.resolver import RESOLVER_NAME, lora_request, register_resolver
    from slora_plugin.config import SLoRAConfig
    from slora_plugin.patches.openai_errors import AdapterRequestError

    path = write_random_adapter(str(tmp_path / "org" / "a"), tiny_dims, 4, TARGETS)
    resolver = register_resolver(SLoRAConfig(adapter_dir=str(tmp_path)))
    try:
        assert LoRAResolverRegistry.get_resolver(RESOLVER_NAME) is resolver
        assert register_resolver(SLoRAConfig(adapter_dir=str(tmp_path))) is resolver  # idempotent
        req = asyncio.run(resolver.resolve_lora("base", "org/a"))
        assert req.lora_name == "org/a" and req.lora_path == os.path.realpath(path)
        assert asyncio.run(resolver.resolve_lora("base", "org/missing")) is None
        # a refused name is a bad request (vLLM answers 400 with this text), not an unknown one
        with pytest.raises(AdapterRequestError, match=r"'\.\./etc'.*'\.\.' path component"):
            asyncio.run(resolver.resolve_lora("base", "../etc"))
        with pytest.raises(AdapterRequestError, match="not an absolute path"):  # not a name
            asyncio.run(resolver.resolve_lora("base", path))
        again = lora_request("org/a", str(tmp_path))
        assert again.lora_int_id == req.lora_int_id and again.lora_path == req.lora_path
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    assert register_resolver(None) is None


def test_cli_synth_and_check(tmp_path, tiny_model_dir, capsys):
    from slora_plugin.adapters import cli

    parser = argparse.ArgumentParser()
    cli.add_subparser(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = str(tmp_path / "fleet")
    assert run("adapters", "synth", out, "--count", "12", "--ranks", "4,8", "--model", tiny_model_dir,
               "--distinct", "2", "--targets", "q_proj,down_proj") == 0
    names = AdapterIndex(out).scan()
    assert len(names) == 12
    inodes = {os.stat(os.path.join(out, n, "adapter_model.safetensors")).st_ino for n in names}
    assert len(inodes) == 4  # 2 distinct files per rank, the rest hard links
    assert run("adapters", "check", out, "--model", tiny_model_dir) == 0
    with open(os.path.join(out, names[3], CONFIG_NAME), "w") as f:
        f.write("{}")
    with open(os.path.join(out, names[5], "adapter_model.safetensors"), "r+b") as f:
        f.truncate(100)  # a hard link: every adapter sharing this file is broken too
    capsys.readouterr()
    assert run("adapters", "check", out, "--model", tiny_model_dir) == 1
    table = capsys.readouterr().out
    assert "ADAPTER" in table and names[3] in table and "peft_type" in table and names[5] in table
    assert run("adapters", "check", out) == 1


def test_relative_lora_path_is_taken_from_the_working_directory(tmp_path, tiny_dims, monkeypatch):
    """Issue 17: a relative `lora_path` that leads to an adapter from the working directory is
    read from there, as stock vLLM reads it (here a path through a hidden directory, which as a
    name would be refused); an HTTP name never is (the resolver confines names)."""
    from slora_plugin.adapters.resolver import SLoRAResolver
    from slora_plugin.patches.openai_errors import AdapterRequestError

    work = tmp_path / "work"
    path = write_random_adapter(str(work / ".x" / "adapters" / "a"), tiny_dims, 4, TARGETS)
    write_random_adapter(str(tmp_path / "dir" / "a"), tiny_dims, 2, TARGETS)
    monkeypatch.chdir(work)
    with AdapterStore(tiny_dims, 4096, torch.float16, adapter_dir=str(tmp_path / "dir"), max_rank=16,
                      host_cache_bytes=1 << 22, loader_threads=1) as store:
        assert store.locate(".x/adapters/a") == (".x/adapters/a", os.path.realpath(path))
        assert store.spec(".x/adapters/a").ranks == {"q_proj": 4, "v_proj": 4}
        with store.get(".x/adapters/a") as lease:
            assert lease.spec.path == os.path.realpath(path)
        assert store.spec("a").ranks == {"q_proj": 2, "v_proj": 2}  # a name: the directory's
    with pytest.raises(AdapterRequestError, match="hidden component"):
        SLoRAResolver(AdapterSources(str(tmp_path / "dir"))).resolve(".x/adapters/a")


def test_a_name_of_the_directory_wins_over_a_same_named_path_in_the_working_directory(
        tmp_path, tiny_dims, monkeypatch):
    """The adapter directory is looked up first: a `lora_path` "org/a" that is an adapter of the
    directory is that adapter even when ./org/a is an adapter too; only a path that is no
    adapter of the directory is read from the working directory."""
    work = tmp_path / "work"
    write_random_adapter(str(work / "org" / "a"), tiny_dims, 4, TARGETS)
    write_random_adapter(str(work / "org" / "b"), tiny_dims, 4, TARGETS)
    in_dir = write_random_adapter(str(tmp_path / "dir" / "org" / "a"), tiny_dims, 2, TARGETS)
    monkeypatch.chdir(work)
    sources = AdapterSources(str(tmp_path / "dir"))
    assert sources.locate("org/a") == ("org/a", os.path.realpath(in_dir))
    assert sources.locate("org/b") == ("org/b", os.path.realpath(work / "org" / "b"))


def test_relative_lora_path_that_leads_nowhere_says_how_to_name_the_adapter(tmp_path, tiny_dims,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = AdapterSources(str(tmp_path))
    with pytest.raises(AdapterError) as e:
        sources.locate(".x/adapters/missing")
    message = str(e.value)
    assert "'.x/adapters/missing'" in message and "hidden component" in message
    assert f"relative to the working directory {tmp_path}" in message
    assert "absolute, or relative to the working directory" in message and "slora.adapter_dir" in message
    with pytest.raises(AdapterNotFoundError):  # a plain name that is nowhere: not found, as before
        sources.locate("org/missing")
