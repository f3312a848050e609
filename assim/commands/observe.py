"""``assim observe TRUTH.nc --operator every:4 --sigma 1 --every 1 --seed S --out OBS.nc``.

Draws synthetic observations ``y_k = h(x_k) + eps_k`` of a truth trajectory at the
truth times ``every, 2 every, ...`` (time index 0 is the initial state and is not
observed). The output has ``y(time, obs)``, the truth's ``time`` / ``model_time``
coordinates, ``truth_index(time)`` and the grid position of each observation
(``obs_<dim>(obs)``, index units). Its attributes record everything needed to
rebuild the :class:`~assim.obs.Observation` (``operator``, ``sigma``, ``noise``,
``df``) and the truth's system, parameters and time step.
"""

from __future__ import annotations

import argparse

from assim.commands._common import add_seed
from assim.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("truth", help="truth trajectory netCDF (dims time, *grid)")
    parser.add_argument(
        "--operator",
        default="identity",
        help="observation operator: identity, every:K, stride:K, coarsen:F, with optional "
        "arctan / saturating / cubic, comma-separated (default %(default)s)",
    )
    parser.add_argument("--sigma", type=float, required=True, help="noise std (or t scale)")
    parser.add_argument(
        "--noise", choices=("gaussian", "student-t"), default="gaussian", help="noise law"
    )
    parser.add_argument("--df", type=float, default=None, help="Student-t degrees of freedom")
    parser.add_argument("--every", type=int, default=1, help="observe every K-th truth time")
    parser.add_argument(
        "--missing", type=float, default=0.0, help="fraction of entries set to NaN (unobserved)"
    )
    parser.add_argument("--variable", default=None, help="truth variable (default: the only one)")
    add_seed(parser)
    parser.add_argument("--out", required=True, help="observation netCDF to write")


def truth_variable(ds, path: str, variable: str | None) -> str:
    """The state variable of a truth file (``--variable``, ``assim_variable`` or the only
    data variable)."""
    from assim.io import choose_variable

    var = choose_variable(ds, path, variable or ds.attrs.get("assim_variable"))
    if ds[var].dims[0] != "time" or "member" in ds[var].dims:
        raise InputError(
            f"{path}: variable {var!r} has dims {ds[var].dims}; expected (time, *grid) "
            "with one member"
        )
    return var


def observation_from_attrs(ds, source: str = "observations"):
    """The :class:`~assim.obs.Observation` recorded in an observation file's attributes."""
    from assim.obs import make_observation

    a = ds.attrs
    if "operator" not in a or "sigma" not in a:
        raise InputError(
            f"{source}: missing attribute 'operator' or 'sigma'; expected a file written "
            "by 'assim observe'"
        )
    df = a.get("df")
    df = None if df is None or (isinstance(df, float) and df != df) else float(df)
    return make_observation(
        str(a["operator"]), float(a["sigma"]), str(a.get("noise", "gaussian")), df
    )


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch
    import xarray as xr

    from assim.io import read_dataset, write_dataset
    from assim.obs import make_observation

    if args.every < 1:
        raise InputError(f"--every must be >= 1, got {args.every}")
    if not 0.0 <= args.missing < 1.0:
        raise InputError(f"--missing must lie in [0, 1), got {args.missing}")
    obs = make_observation(args.operator, args.sigma, args.noise, args.df)
    ds = read_dataset(args.truth)
    var = truth_variable(ds, args.truth, args.variable)
    idx = np.arange(args.every, ds.sizes["time"], args.every)
    if idx.size == 0:
        raise InputError(
            f"{args.truth}: {ds.sizes['time']} times leave nothing to observe with "
            f"--every {args.every} (time index 0 is the initial state)"
        )
    sel = ds[var].isel(time=idx)
    grid_dims = [str(d) for d in sel.dims[1:]]
    state_shape = tuple(sel.shape[1:])
    x = torch.as_tensor(sel.values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(args.seed))
    y = obs.sample(x, gen).numpy()
    if args.missing > 0:
        rng = np.random.default_rng(int(args.seed) + 1)
        y[rng.random(y.shape) < args.missing] = np.nan
    coords = {"time": sel["time"], "truth_index": ("time", idx.astype(np.int64))}
    if "model_time" in sel.coords:
        coords["model_time"] = sel["model_time"]
    pos = obs.operator.coords(state_shape).numpy()
    for j, d in enumerate(grid_dims):
        coords[f"obs_{d}"] = ("obs", pos[:, j], {"long_name": f"observation position along {d}"})
    out = xr.Dataset(
        {"y": (("time", "obs"), y, {"long_name": f"observations of {var}", "units": "1"})},
        coords=coords,
    )
    out.attrs = {
        "title": f"synthetic observations of {var}",
        "operator": obs.operator.spec,
        "sigma": float(args.sigma),
        "noise": args.noise,
        "every": int(args.every),
        "missing_fraction": float(args.missing),
        "seed": int(args.seed),
        "truth_file": str(args.truth),
        "truth_variable": var,
        "state_shape": json.dumps(list(state_shape)),
        "state_dims": json.dumps(grid_dims),
    }
    if args.df is not None:
        out.attrs["df"] = float(args.df)
    for key in ("system", "params", "dt", "substeps"):
        if key in ds.attrs:
            out.attrs[f"truth_{key}"] = ds.attrs[key]
    path = write_dataset(out, args.out)
    print(f"wrote {path}: y{tuple(out['y'].dims)} {tuple(out['y'].shape)} ({obs.operator.spec})")
    return 0
