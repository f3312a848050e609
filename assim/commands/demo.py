"""``assim demo [--out DIR]``: the end-to-end demo on an embedded default.

Steps are small functions listed in :data:`STEPS`; each takes the output folder
and a shared context dict and returns the paths it wrote, so later issues extend
the demo by appending a step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from assim.commands._common import add_device, add_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="assim-demo", help="output folder (default %(default)s)")
    parser.add_argument("--steps", type=int, default=400, help="Lorenz-96 steps to simulate")
    add_seed(parser, default=1)
    add_device(parser)


def simulate_l96(out: Path, ctx: dict[str, Any]) -> list[Path]:
    """Simulate Lorenz-96 (40 variables, F = 8, dt 0.05) and write the truth as CF
    netCDF plus a Hovmöller PNG."""
    from assim.datasets import simulate_dataset
    from assim.io import write_dataset
    from assim.plot import hovmoller

    ds = simulate_dataset(
        "l96", steps=ctx["steps"], seed=ctx["seed"], spinup=200, device=ctx["device"]
    )
    ctx["truth"] = ds
    nc = write_dataset(ds, out / "l96_truth.nc")
    png = hovmoller(
        ds["state"].values,
        out / "l96_truth.png",
        times=ds["model_time"].values,
        title=f"Lorenz-96 truth (F = 8, seed {ctx['seed']})",
        label="x",
        xlabel="variable index",
        tlabel="model time",
    )
    return [nc, png]


def nightly_cycles(out: Path, ctx: dict[str, Any]) -> list[Path]:
    """Three consecutive nightly L96 cycles (ETKF, synthetic observations in an inbox):
    each cycle folder holds analysis, forecast, restart, a quicklook PNG and a record."""
    from assim.cycle_demo import run_demo_cycles

    folders = run_demo_cycles(out)
    return [f / name for f in folders for name in ("analysis.nc", "quicklook.png")]


STEPS: list[Callable[[Path, dict[str, Any]], list[Path]]] = [simulate_l96, nightly_cycles]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ctx: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "device": args.device}
    for step in STEPS:
        for path in step(out, ctx):
            print(f"wrote {path}")
    print(f"demo output in {out.resolve()}")
    return 0
