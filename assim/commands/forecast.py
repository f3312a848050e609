"""``assim forecast``: ensemble forecast of a world model from a netCDF initial state.

Examples::

    assim forecast --world l96.pt --init analysis.nc --steps 40 --members 16 --out fc.nc
    assim forecast --world physical:l96 --init truth.nc --steps 40 --members 1 --out fc.nc

The initial condition is the variable (the world's, or ``--variable``) at the last
time of ``--init`` (or ``--time-index``); a ``member`` dim there is an initial
ensemble. The output is CF: ``(time, member, *grid)`` with
``forecast_reference_time`` and ``forecast_period``.
"""

from __future__ import annotations

import argparse

from assim.commands._common import add_device, add_seed
from assim.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", required=True, help="checkpoint (.pt) or physical:l96|l63|...")
    parser.add_argument("--init", required=True, help="netCDF file with the initial state")
    parser.add_argument("--variable", default=None, help="variable in --init (default: world's)")
    parser.add_argument("--time-index", type=int, default=-1, help="time of --init (default last)")
    parser.add_argument("--steps", type=int, required=True, help="number of world steps")
    parser.add_argument("--members", type=int, default=16, help="ensemble size (default 16)")
    parser.add_argument("--q", type=float, default=None, help="model-error std (diffusion worlds)")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="diffusion steps")
    parser.add_argument("--out", required=True, help="forecast netCDF to write")
    add_device(parser)
    add_seed(parser)


def load_world(spec: str, device):
    """A world from a checkpoint path or ``physical:<name>``; errors become InputError."""
    import models

    try:
        return models.load(spec, device=device)
    except ValueError as exc:
        raise InputError(f"--world {spec}: {exc}") from exc


def initial_state(path: str, world, variable: str | None, time_index: int):
    """``(values, reference_time, variable, grid dims, attrs, has_members)`` from ``path``.

    ``values`` is ``(*S)`` or ``(M, *S)``; for a world with history ``h > 1`` the last
    ``h`` times: ``(h, *S)`` or ``(M, h, *S)``."""
    import numpy as np

    from assim.io import choose_variable, read_dataset

    ds = read_dataset(path)
    var = choose_variable(
        ds, path, variable or getattr(world, "variable", None), hint="; pass --variable"
    )
    da = ds[var]
    ref = None
    h = int(getattr(world, "history", 1))
    if "time" in da.dims:
        n = da.sizes["time"]
        if not -n <= time_index < n:
            raise InputError(f"--time-index {time_index} out of range for {n} times in {path}")
        k = time_index % n
        if k + 1 < h:
            raise InputError(f"{path}: the world needs {h} times up to --time-index, has {k + 1}")
        window = da.isel(time=slice(k + 1 - h, k + 1))
        da = da.isel(time=k)
        ref = da["model_time"].values if "model_time" in da.coords else da["time"].values
        if h > 1:  # (h, *S) or (member, h, *S): the history window, oldest first
            da = window.rename(time="_history")
    elif "forecast_reference_time" in da.coords:
        ref = da["forecast_reference_time"].values
    grid = tuple(str(d) for d in da.dims if d not in ("member", "_history"))
    lead_dims = tuple(d for d in ("member", "_history") if d in da.dims)
    da = da.transpose(*lead_dims, *grid)
    shape = tuple(da.sizes[d] for d in grid)
    if tuple(shape) != tuple(world.state_shape):
        raise InputError(
            f"{path}: variable {var!r} has grid {dict(zip(grid, shape, strict=True))}, "
            f"the world expects grid shape {tuple(world.state_shape)}"
        )
    values = np.asarray(da.values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise InputError(f"{path}: variable {var!r} has NaN/inf in the initial state")
    return values, ref, var, grid, dict(da.attrs), "member" in da.dims


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from assim.io import forecast_dataset, write_dataset
    from models.device import resolve_device

    if args.steps < 1 or args.members < 1:
        raise InputError(f"--steps and --members must be >= 1, got {args.steps}, {args.members}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    world = load_world(args.world, device)
    if args.q is not None or args.diffusion_steps is not None:
        if not hasattr(world, "configure"):
            raise InputError(f"--q/--diffusion-steps need a diffusion world, not {args.world}")
        world.configure(q=args.q, steps=args.diffusion_steps)
    values, ref, var, grid, attrs, has_members = initial_state(
        args.init, world, args.variable, args.time_index
    )
    x0 = torch.as_tensor(values, device=device)
    if has_members and x0.shape[0] != args.members:
        raise InputError(
            f"{args.init}: initial ensemble has {x0.shape[0]} members, --members {args.members}"
        )
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = world.forecast(x0, args.steps, members=args.members, generator=g)
    lead = np.arange(1, args.steps + 1, dtype=np.float64) * float(world.dt)
    if ref is None:
        ref = np.float64(0.0)
    elif np.issubdtype(np.asarray(ref).dtype, np.datetime64):
        lead = np.round(lead * 86400e9).astype("timedelta64[ns]")  # one model time unit = a day
    ds = forecast_dataset(
        x.cpu(),
        ref,
        lead,
        grid,
        name=var,
        units=attrs.get("units", "1"),
        long_name=attrs.get("long_name"),
        attrs={"source": f"assim forecast --world {args.world}", "seed": args.seed},
    )
    path = write_dataset(ds, args.out)
    print(f"wrote {path}")
    return 0
