"""``assim train``: fit a world model on gridded data and write a checkpoint.

Examples::

    assim train --world conditional --data l96 --steps 3000 --out l96.pt
    assim train --config experiments/l96_conditional.toml --out l96.pt --device cuda

``--data`` is a dataset catalogue name (prepared on first use) or a netCDF path.
Command-line values override the TOML config; the checkpoint loads with
``models.load(path)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from assim.commands._common import add_device, add_seed
from assim.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", default=None, help="world kind (default: conditional)")
    parser.add_argument("--data", default=None, help="catalogue name (e.g. l96) or netCDF path")
    parser.add_argument("--variable", default=None, help="data variable (default: the only one)")
    parser.add_argument("--config", default=None, help="TOML file of TrainConfig fields")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (caps epochs)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--resume", default=None, help="Lightning .ckpt to resume from")
    parser.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device(parser)
    add_seed(parser)


def resolve_data(data: str) -> Path:
    """A netCDF path as given, else a dataset catalogue name prepared into the cache."""
    path = Path(data)
    if path.suffix in (".nc", ".nc4") or path.is_file():
        if not path.is_file():
            raise InputError(f"--data {data}: file not found")
        return path
    try:
        from assim import datasets
    except ImportError as exc:
        raise InputError(f"--data {data}: not a file, and no dataset catalogue ({exc})") from exc
    try:
        return Path(datasets.prepare(data))
    except (KeyError, ValueError) as exc:
        raise InputError(f"--data {data}: {exc}") from exc


def _accelerator(device: str | None) -> tuple[str, int | list[int]]:
    from models.device import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if dev.type == "cuda":
        return "gpu", [dev.index or 0]
    return "cpu", 1


def run(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train_world

    accelerator, devices = _accelerator(args.device)
    overrides = dict(
        world=args.world,
        variable=args.variable,
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ckpt_path=args.resume,
        out=args.out,
        seed=args.seed,
        accelerator=accelerator,
        devices=devices,
        progress=False if args.no_progress else None,
    )
    try:
        if args.config:
            config = TrainConfig.from_toml(args.config, **overrides)
        else:
            config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
        data = args.data or config.data
        if not data:
            raise InputError("no training data: give --data NAME|FILE.nc or `data` in --config")
        config = dataclasses.replace(config, data=str(resolve_data(data)))
        path = train_world(config)
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    print(f"wrote {path}")
    return 0
