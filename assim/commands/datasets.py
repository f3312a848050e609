"""``assim datasets list`` and ``assim datasets prepare NAME [NAME ...]``.

Prepared files go to ``$ASSIM_DATA_DIR`` (default: the user cache dir + ``/assim``);
rerunning ``prepare`` with an unchanged recipe does nothing.
"""

from __future__ import annotations

import argparse

from assim.commands._common import add_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    sub.add_parser("list", help="list the catalogue")
    prep = sub.add_parser("prepare", help="write datasets into the cache folder")
    prep.add_argument("names", nargs="+", metavar="NAME", help="dataset name(s)")
    prep.add_argument("--cache-dir", default=None, help="override $ASSIM_DATA_DIR")
    add_device(prep)


def run(args: argparse.Namespace) -> int:
    from assim import datasets

    if args.action == "list":
        entries = datasets.list_datasets()
        width = max(map(len, entries))
        for name, desc in entries.items():
            print(f"{name:<{width}}  {desc}")
        print(f"cache folder: {datasets.resolve_cache_dir()}")
        return 0
    for name in args.names:
        path = datasets.prepare(name, args.cache_dir, device=args.device)
        print(path)
    return 0
