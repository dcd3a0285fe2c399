"""`slora-plugin adapters ...`: write synthetic adapters, check a directory.

`synth` makes benchmark fleets quickly: `--distinct K` writes K weight files per rank and hard
links the rest, so 2,000 Llama-7B adapters take a few GB of disk, yet each is its own directory,
name and lora_int_id to every loader (none of them deduplicates by inode).
`check` validates every adapter of a directory the way the server would and prints a table of
what is wrong (exit code 1 if anything is), symlinks the server will not follow included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

from slora_plugin.adapters.compressed import (
    CollectionBases, build_compressed_spec, read_cores, read_manifest, split_path)
from slora_plugin.adapters.errors import AdapterError
from slora_plugin.adapters.fleet import FleetAdapter, write_fleet
from slora_plugin.adapters.index import AdapterIndex
from slora_plugin.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from slora_plugin.compress.cli import add_compress_parser
from slora_plugin.compress.collection import MANIFEST
from slora_plugin.layout import MODULES, ModelDims

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: `check` shows a progress bar (stderr) from this many adapters on: a full check reads every
#: weight file, minutes for thousands of large adapters.
CHECK_PROGRESS_MIN = 20


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register `adapters synth`, `check` and `compress` on the top-level parser's subparsers."""
    adapters = subparsers.add_parser("adapters", help="write synthetic adapters; check or compress a directory")
    sub = adapters.add_subparsers(dest="adapters_command", required=True)

    synth = sub.add_parser("synth", help="write N valid random PEFT adapters")
    synth.add_argument("dir", help="output adapter directory (created)")
    synth.add_argument("--count", type=int, required=True, help="number of adapters")
    synth.add_argument("--ranks", default="8,16,32,64", help="comma-separated ranks, used in turn")
    synth.add_argument("--model", required=True, help="directory with the base model's config.json")
    synth.add_argument("--distinct", type=int, default=None,
                       help="write K distinct weight files per rank and hard-link the others")
    synth.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                       help=f"comma-separated modules (of {','.join(MODULES)})")
    synth.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    synth.add_argument("--prefix", default="adapter-", help="adapter name prefix")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    check = sub.add_parser("check", help="validate every adapter of a directory")
    check.add_argument("dir", help="adapter directory")
    check.add_argument("--model", help="directory with the base model's config.json (full checks)")
    check.add_argument("--max-rank", type=int, default=128, help="largest rank accepted")
    check.set_defaults(func=_check)
    add_compress_parser(sub)


def model_dims(model_dir: str) -> ModelDims:
    """ModelDims from a model directory's config.json (no transformers import needed)."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--model: cannot read {path}: {e}") from None
    cfg = cfg.get("text_config", cfg)
    try:
        return ModelDims.from_hf_config(SimpleNamespace(**cfg))
    except (AttributeError, TypeError, ValueError) as e:
        raise SystemExit(f"--model: {path} is not a decoder config this plugin understands ({e})") from None


def synthesize(directory: str, count: int, ranks: list[int], dims: ModelDims, targets: list[str],
               distinct: int | None = None, dtype: torch.dtype = torch.float16, prefix: str = "adapter-",
               seed: int = 0, progress: bool = False) -> list[str]:
    """Write `count` adapters; returns their names. See the module docstring for `distinct`:
    adapter i has rank ranks[i % len(ranks)] and shares the weights file of slot
    (i // len(ranks)) % distinct of its rank, whose first adapter j writes it with seed
    seed * 1_000_003 + j (adapters/fleet.py)."""
    bad = [t for t in targets if t not in MODULES]
    if bad or not targets:
        raise SystemExit(f"--targets: unknown module(s) {bad}; choose from {list(MODULES)}")
    if count < 1 or not ranks or any(r < 1 for r in ranks) or (distinct is not None and distinct < 1):
        raise SystemExit("--count, --ranks and --distinct must be positive")
    width = max(5, len(str(count - 1)))
    fleet = []
    for i in range(count):
        rank = ranks[i % len(ranks)]
        group = f"r{rank}-v{(i // len(ranks)) % distinct}" if distinct else None
        fleet.append(FleetAdapter(f"{prefix}{i:0{width}d}", rank, seed * 1_000_003 + i, group))
    return write_fleet(directory, fleet, dims, targets, dtype, progress=progress)


def check_directory(directory: str, dims: ModelDims | None, max_rank: int = 128,
                    progress: bool = False) -> tuple[int, list[AdapterError]]:
    """(number of adapters, problems). With `dims`: exactly the server's validation (config and
    a full load); without: everything that does not need the model. Directory symlinks leading
    outside `directory`, which the server never serves, count as adapters with a problem.
    Adapters of compressed collections: with `dims`, validated and read as the store reads them
    (cores and bases, `adapters/compressed.py`); without, their manifest entry is checked.
    `progress`: a tqdm bar on stderr when there are at least CHECK_PROGRESS_MIN adapters."""
    from tqdm import tqdm

    from slora_plugin.adapters.loader import check_weights_file, read_raw
    from slora_plugin.adapters.spec import build_spec, files_key
    from slora_plugin.adapters.validate import check_fields, load_config_json
    from slora_plugin.raw_format import RawAdapter, raw_layout

    index = AdapterIndex(directory)
    names = index.scan()
    problems = list(index.skipped)
    if dims is not None:  # one row of the widest module per page: any layout fits
        page = max(max(dims.module_io(m)) for m in MODULES)
    bases = CollectionBases(dims, torch.float32) if dims is not None else None
    quiet = not progress or len(names) < CHECK_PROGRESS_MIN
    for name in tqdm(names, desc="checking adapters", unit="adapter", disable=quiet):
        try:
            path = index.locate(name)
            member = split_path(path) if not os.path.isfile(os.path.join(path, CONFIG_NAME)) else None
            if member is not None:
                _check_compressed(name, path, member, dims, bases)
            elif dims is not None:
                spec = build_spec(name, path, files_key(path), dims, page, max_rank)
                layout = raw_layout(spec.layout, dims.num_hidden_layers, torch.float32)
                read_raw(spec, dims, RawAdapter(torch.empty(layout.nbytes, dtype=torch.uint8), layout))
            else:
                with open(os.path.join(path, CONFIG_NAME), "rb") as f:
                    check_fields(load_config_json(f.read(), name), name, max_rank)
                if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
                    raise AdapterError(name, WEIGHTS_NAME, f"not found in {path}")
                check_weights_file(name, os.path.join(path, WEIGHTS_NAME))
        except AdapterError as e:
            problems.append(e)
    return len(names) + len(index.skipped), problems


def _check_compressed(name: str, path: str, member: tuple[str, str], dims: ModelDims | None,
                      bases: CollectionBases | None) -> None:
    """One compressed adapter of `check_directory` (AdapterError when it has a problem); each
    collection's bases are read once (`bases`, given with `dims`)."""
    collection, adapter = member
    if dims is None:
        if adapter not in read_manifest(collection, name).adapters:
            raise AdapterError(name, os.path.join(collection, MANIFEST), f"the collection has no "
                                                                        f"adapter {adapter!r}")
        return
    manifest = read_manifest(collection, name)
    page = max(manifest.rank, 1)  # one core row per page: any core layout fits
    spec = build_compressed_spec(name, path, collection, adapter, dims, page)
    read_cores(spec, torch.float32)
    assert bases is not None
    bases.get(spec)


def format_table(problems: list[AdapterError]) -> str:
    rows = [("ADAPTER", "FILE", "PROBLEM")] + [(p.adapter, p.file or "-", p.reason) for p in problems]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def _synth(args: argparse.Namespace) -> int:
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--ranks: expected comma-separated integers, got {args.ranks!r}") from None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    names = synthesize(args.dir, args.count, ranks, model_dims(args.model), targets, args.distinct,
                       DTYPES[args.dtype], args.prefix, args.seed, progress=True)
    print(f"wrote {len(names)} adapters to {args.dir}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.dir):
        raise SystemExit(f"{args.dir}: not a directory")
    dims = model_dims(args.model) if args.model else None
    count, problems = check_directory(args.dir, dims, args.max_rank, progress=True)
    if problems:
        print(format_table(problems))
    scope = "" if dims else " (config and weight files only; pass --model for the full check)"
    print(f"{count} adapters checked{scope}, {len(problems)} with problems",
          file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0
