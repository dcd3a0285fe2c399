"""`slora-plugin adapters compress SRC_DIR OUT_DIR --rank K [--clusters C] [--diagonal] [--model DIR]`."""

from __future__ import annotations

import argparse
import sys

from slora_plugin.compress.collection import STORAGE_DTYPES


def add_compress_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `compress` on the `adapters` command's subparsers."""
    p = subparsers.add_parser("compress", help="jointly compress a directory of adapters (Compress-then-Serve)",
                              description="Write OUT_DIR: shared bases per cluster, a core per adapter, "
                                          "collection.json and report.{json,md} (errors and bytes).")
    p.add_argument("src", help="adapter directory (PEFT adapters, one sub-directory each)")
    p.add_argument("out", help="output collection directory (new or empty)")
    p.add_argument("--rank", type=int, required=True, help="K: columns of the shared bases")
    p.add_argument("--clusters", type=int, default=1, help="C: groups of adapters with their own bases")
    p.add_argument("--diagonal", action="store_true", help="diagonal cores (K numbers) instead of K x K")
    p.add_argument("--model", help="directory with the base model's config.json (else inferred from "
                                   "the adapters' shapes)")
    p.add_argument("--iters", type=int, default=2, help="refinement passes after the stacked-SVD bases")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16",
                   help="storage dtype of bases and cores")
    p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--max-rank", type=int, default=128, help="largest source rank accepted")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    from slora_plugin.adapters.cli import model_dims
    from slora_plugin.compress.api import compress_collection
    from slora_plugin.compress.report import summary_line
    from slora_plugin.compress.source import CompressError

    dims = model_dims(args.model) if args.model else None
    try:
        report = compress_collection(args.src, args.out, args.rank, clusters=args.clusters, diagonal=args.diagonal,
                                     dims=dims, iters=args.iters, dtype=STORAGE_DTYPES[args.dtype],
                                     device=args.device, max_rank=args.max_rank, seed=args.seed, progress=True)
    except CompressError as e:
        print(f"compress: {e}", file=sys.stderr)
        return 1
    print(summary_line(report))
    print(f"wrote {args.out} (report: {args.out}/report.md)")
    return 0
