"""The ``assim`` command. Each subcommand lives in ``assim/commands/<name>.py`` and
exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen
inside ``run`` so that ``assim --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from assim.errors import InputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("assim.commands.demo", "run the end-to-end demo on an embedded default"),
    "simulate": ("assim.commands.simulate", "simulate l63/l96/kolmogorov to CF netCDF"),
    "datasets": ("assim.commands.datasets", "list or prepare catalogue datasets"),
    "train": ("assim.commands.train", "train a world model and write a checkpoint"),
    "forecast": ("assim.commands.forecast", "ensemble forecast of a world model to CF netCDF"),
    "cycle": ("assim.commands.cycle", "run a nightly forecast cycle (or catch up missed ones)"),
    "impute": ("assim.commands.impute", "sample missing values of a gridded field"),
    "detect": ("assim.commands.detect", "anomaly scores, flags and a map for a gridded field"),
    "observe": ("assim.commands.observe", "draw synthetic observations of a truth file"),
    "assimilate": ("assim.commands.assimilate", "run a filter over observations to CF netCDF"),
    "score": ("assim.commands.score", "rmse.a, spread and CRPS of an analysis vs a truth"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="assim",
        description="Data assimilation, imputation and anomaly detection with diffusion "
        "world models and particle filters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except InputError as exc:
        print(f"assim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
