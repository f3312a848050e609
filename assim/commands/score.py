"""``assim score A.nc --truth TRUTH.nc [--burn-in K]``: verify an analysis file.

Prints, over the cycles after the burn-in: ``rmse.a`` (DAPPER's definition: the time
mean of the spatial RMS error of the analysis mean), ``spread`` (time mean of the
analysis spread), ``crps`` (fair ensemble CRPS averaged over grid points and cycles
when the file holds the members, else the closed-form CRPS of the Gaussian
``N(mean, std^2)`` per grid point, labelled ``crps.gauss``), the mean ESS, the
number of skipped cycles and the mean log-evidence increment when the method has one.
"""

from __future__ import annotations

import argparse

from assim.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("analysis", help="analysis netCDF from 'assim assimilate'")
    parser.add_argument("--truth", required=True, help="truth netCDF")
    parser.add_argument("--burn-in", type=int, default=0, help="cycles left out at the start")
    parser.add_argument("--variable", default=None, help="truth variable (default: the only one)")


def gaussian_crps(mean, std, y):
    """CRPS of ``N(mean, std^2)`` at ``y`` (Gneiting et al. 2005), elementwise."""
    import numpy as np
    from scipy import stats

    std = np.maximum(std, 1e-300)
    z = (y - mean) / std
    return std * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))


def scores(ads, truth, burn_in: int = 0) -> dict[str, float]:
    """The scores of analysis dataset ``ads`` against ``truth`` ``(K, *S)``."""
    import numpy as np

    from assim.metrics import crps_ensemble, rmse_a

    K = ads.sizes["time"]
    if not 0 <= burn_in < K:
        raise InputError(f"--burn-in {burn_in}: must lie in [0, {K}) for {K} cycles")
    sl = slice(burn_in, None)
    mean = ads["mean"].values
    out = {"cycles": float(K - burn_in), "rmse.a": rmse_a(mean, truth, burn_in=burn_in)}
    out["spread"] = float(np.nanmean(ads["spread"].values[sl]))
    if "ensemble" in ads:
        ens = np.moveaxis(ads["ensemble"].values[sl], 1, 0)
        out["crps"] = float(np.nanmean(crps_ensemble(ens, truth[sl]).numpy()))
    else:
        g = gaussian_crps(mean[sl], ads["std"].values[sl], truth[sl])
        out["crps.gauss"] = float(np.nanmean(g))
    ess = ads["ess"].values[sl]
    if np.isfinite(ess).any():
        out["ess"] = float(np.nanmean(ess))
    out["skipped"] = float(ads["skipped"].values[sl].sum())
    lz = ads["log_z"].values[sl]
    if np.isfinite(lz).any():
        out["log_z/cycle"] = float(np.nanmean(lz))
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from assim.commands.observe import truth_variable
    from assim.io import read_dataset

    ads = read_dataset(args.analysis, var="mean")
    for name in ("spread", "std", "ess", "skipped", "log_z"):
        if name not in ads:
            raise InputError(
                f"{args.analysis}: variable {name!r} missing; expected an analysis file"
            )
    tds = read_dataset(args.truth)
    var = truth_variable(tds, args.truth, args.variable)
    if "model_time" in ads.coords and "model_time" in tds.coords:
        t_all, t = tds["model_time"].values, ads["model_time"].values
        pos = np.clip(np.searchsorted(t_all, t), 0, len(t_all) - 1)
        if not np.allclose(t_all[pos], t):
            raise InputError(
                f"{args.truth}: does not contain the analysis times of {args.analysis}"
            )
        truth = tds[var].values[pos]
    else:
        truth = tds[var].sel(time=ads["time"]).values
    if truth.shape != ads["mean"].shape:
        raise InputError(
            f"{args.truth}: truth {truth.shape} does not match the analysis {ads['mean'].shape}"
        )
    for key, value in scores(ads, truth, args.burn_in).items():
        print(f"{key:<12} {value:.6g}")
    return 0
