"""``assim detect IN.nc --var NAME --method {evidence,imputation,dte} --out SCORES.nc``:
anomaly scores per grid point and time, flags at a target false-alarm rate, PNG map."""

from __future__ import annotations

import argparse

from assim.commands._common import add_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.nc", help="netCDF with a (time, lat, lon) field")
    parser.add_argument("--var", required=True, help="name of the field to score")
    parser.add_argument(
        "--method",
        choices=("evidence", "imputation", "dte"),
        default="evidence",
        help="predictive evidence (default), imputation error, or diffusion-time estimate",
    )
    parser.add_argument(
        "--prior", default="gaussian", help="'gaussian' (fit on IN.nc) or a prior checkpoint"
    )
    parser.add_argument("--mask", default=None, help="variable of IN.nc: 1 = valid grid point")
    parser.add_argument(
        "--far", type=float, default=0.01, help="target false-alarm rate per point (default 0.01)"
    )
    parser.add_argument(
        "--clean-steps",
        type=int,
        default=48,
        help="clean fields drawn from the prior to set the threshold (48)",
    )
    parser.add_argument("--out", required=True, metavar="SCORES.nc", help="output netCDF")
    parser.add_argument("--png", default=None, help="score/flag map (default: OUT with .png)")
    add_seed(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch
    import xarray as xr

    from assim import io
    from assim.anomaly import clean_threshold, flags, score_fields
    from assim.commands.impute import load_prior, read_field
    from assim.errors import InputError
    from assim.impute import field_data, prior_for

    if not 0 < args.far < 1:
        raise InputError(f"--far must be in (0, 1), got {args.far}")
    da, mask = read_field(args.input, args.var, args.mask)
    data = field_data(da, mask)
    valid, vals = data.valid, data.values
    if not bool(torch.isfinite(vals).all()):
        raise InputError(
            f"{args.input}: {args.var!r} has missing values at valid points; "
            "run `assim impute` first (anomaly scores need complete fields)"
        )
    gen = torch.Generator().manual_seed(args.seed)
    prior = prior_for(data, load_prior(args.prior), args.var, gen)
    groups = data.groups % prior.n_groups
    scores, extra = score_fields(prior, args.method, vals, groups, valid, gen)
    thr = clean_threshold(prior, args.method, args.far, valid, args.clean_steps, gen)
    fl = flags(scores, thr)

    def grid(a: torch.Tensor, fill=np.nan, dtype=np.float32) -> np.ndarray:
        out = np.full((a.shape[0], *valid.shape), fill, dtype=dtype)
        out[:, valid] = a.numpy().astype(dtype)
        return out

    dims = tuple(da.dims)
    ds = xr.Dataset(
        {
            "score": (dims, grid(scores), {"long_name": f"anomaly score ({args.method})"}),
            "flag": (
                dims,
                grid(fl, 0, np.int8),
                {"long_name": f"score > threshold (target false-alarm rate {args.far})"},
            ),
        },
        coords={d: da[d] for d in dims},
        attrs={
            "title": f"anomaly scores of {args.var}",
            "method": args.method,
            "threshold": thr,
            "false_alarm_rate": args.far,
            "source": str(args.input),
        },
    )
    if "t_hat" in extra:
        ds["t_hat"] = (dims[:1], extra["t_hat"].numpy(), {"long_name": "diffusion-time estimate"})
    io.write_dataset(ds, args.out)
    png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    _plot(ds, valid, png, f"{args.var}: {args.method} (threshold {thr:.3g}, FAR {args.far})")
    print(
        f"{int(fl.sum())} of {fl.numel()} points flagged (threshold {thr:.3g}) -> {args.out}, {png}"
    )
    return 0


def _plot(ds, valid, path, title: str) -> None:
    """Score map of the step with the largest score, flagged points circled in red, and
    the number of flags over the whole period per point."""
    import numpy as np
    from matplotlib.figure import Figure

    from assim.plot import save_figure

    sc, fl = ds["score"].values, ds["flag"].values
    k = int(np.nanargmax(np.where(np.isnan(sc), -np.inf, sc).max((1, 2))))
    fig = Figure(figsize=(10, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(sc[k], origin="lower", cmap="viridis")
    ii, jj = np.nonzero(fl[k])
    ax1.scatter(jj, ii, s=12, facecolors="none", edgecolors="red", linewidths=0.8)
    ax1.set_title(f"score at step {k} (red: flagged)", fontsize=9)
    fig.colorbar(im, ax=ax1, shrink=0.8)
    count = np.where(valid, fl.sum(0), np.nan)
    im2 = ax2.imshow(count, origin="lower", cmap="magma")
    ax2.set_title("number of flags over time", fontsize=9)
    fig.colorbar(im2, ax=ax2, shrink=0.8)
    for ax in (ax1, ax2):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
