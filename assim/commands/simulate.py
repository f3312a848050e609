"""``assim simulate {l63,l96,kolmogorov} --steps N --seed S --out FILE.nc``.

Writes one CF-1.8 netCDF trajectory (``--members 1``, dims ``time, *S``) or an
ensemble of independent trajectories (dims ``time, member, *S``), with
``S = (component,)`` for l63 (variable ``state``), ``(x,)`` for l96 (``state``)
and ``(y, x)`` for kolmogorov (``vorticity``). Times are model times ``k dt``
after the spin-up (CF ``days since 2000-01-01``, one model time unit = one day,
plus the coordinate ``model_time``).
"""

from __future__ import annotations

import argparse

from assim.commands._common import add_device, add_seed

SYSTEMS = ("l63", "l96", "kolmogorov")
# default spin-up in world steps: 10 time units for Lorenz, 20 for Kolmogorov
_SPINUP = {"l63": 1000, "l96": 200, "kolmogorov": 100}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("system", choices=SYSTEMS, help="dynamical system")
    parser.add_argument("--steps", type=int, required=True, help="number of states to write")
    add_seed(parser)
    parser.add_argument(
        "--dt",
        type=float,
        default=None,
        help="time between written states (default: l63 0.01, l96 0.05, kolmogorov 0.2)",
    )
    parser.add_argument(
        "--spinup", type=int, default=None, help="discarded steps first (default: 10-20 time units)"
    )
    parser.add_argument("--members", type=int, default=1, help="independent trajectories")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="simulator parameter, repeatable (l63: sigma rho beta; l96: n F; "
        "kolmogorov: n re k_f drag amplitude)",
    )
    parser.add_argument(
        "--float32", action="store_true", help="simulate in float32 (default float64)"
    )
    parser.add_argument("--out", required=True, help="output netCDF file")
    add_device(parser)


def _params(items: list[str]) -> dict[str, float | int]:
    from assim.errors import InputError

    out: dict[str, float | int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise InputError(f"--param {item!r}: expected KEY=NUMBER, e.g. F=8.0") from None
    return out


def run(args: argparse.Namespace) -> int:
    from assim.datasets import simulate_dataset
    from assim.io import write_dataset

    spinup = _SPINUP[args.system] if args.spinup is None else args.spinup
    ds = simulate_dataset(
        args.system,
        steps=args.steps,
        seed=args.seed,
        dt=args.dt,
        spinup=spinup,
        members=args.members,
        params=_params(args.param),
        dtype="float32" if args.float32 else "float64",
        device=args.device,
    )
    path = write_dataset(ds, args.out)
    var = ds.attrs["assim_variable"]
    print(f"wrote {path}: {var}{tuple(ds[var].dims)} {tuple(ds[var].shape)}")
    return 0
