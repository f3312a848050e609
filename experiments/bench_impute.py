"""BENCHMARKS.md E (imputation): climatology, linear interpolation, Matérn OI, the
default Gaussian space-time prior (:mod:`assim.impute`, exact posterior) and the same
prior used as a diffusion prior (its exact denoiser in a 64-step DDPM chain, log-SNR
grid) conditioned by twisted SMC (``method="twisted"``, spatial windows, max(K, 64)
particles; grids of at most ``--twisted-max-points`` points) -- and, on the same
chain, replacement inpainting (biased) -- on real grids.

Protocol: fit on the first 80 % of time steps, test on the last 20 %; hide (a) 30 % and
(b) 70 % of the valid points of every test step at random, (c) a contiguous lat-lon box
of about a sixth of the domain for 3 consecutive test steps; seeds 0, 1, 2. Score on
hidden points only: RMSE of the mean, fair CRPS (K members; MAE for the deterministic
linear interpolation), 90 % central interval coverage.

    python experiments/bench_impute.py [--quick] [--datasets ostia_sst sst_anom ...]

Datasets: ``ostia_sst``, ``e1_north_america``, ``sst_anom`` (BENCHMARKS.md E) and
``kolmogorov32`` / ``kolmogorov64`` / ``kolmogorov32n`` (simulated vorticity on the
periodic square, :func:`load_kolmogorov`; Matérn kernels on the torus; frames one world
step 0.2 apart).

On the Kolmogorov sets a dynamical method is added (unless ``--no-world``): the
stochastic ensemble Kalman smoother of :mod:`assim.impute_world` with the shipped learned
world of the grid (``kolmogorov32`` or ``kolmogorov64``; ``--device cuda`` runs it on a
GPU) over the whole test window (:class:`WorldImputer`: climatological initial members,
static covariance of the world's one-step errors, taper radius,
additive factor and output spread factor tuned on the last ``--world-val`` fit frames
with mask seed 1000, never on the test window or its seeds).

Model selection (``--validate``): the same protocol inside the fit period only -- fit on
its first 75 %, impute its last 25 % with mask seeds ``1000 + seed`` -- so options of
:func:`assim.impute.fit_field_prior` (``--variants "spread_hetero=True" ...``, each a
separately fitted prior in its own row) are chosen without looking at the test window.

Writes ``experiments/results/bench_impute.{md,csv}`` and ``impute_<dataset>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assim.baselines import grouped_climatology, linear_interp  # noqa: E402
from assim.impute import (  # noqa: E402
    field_points,
    fit_field_prior,
    grid_geometry,
    impute_array,
    season_index,
)
from assim.impute_prior import fit_residual, holdout_variance_ratio  # noqa: E402
from experiments.impute_common import (  # noqa: E402,F401 (re-exported)
    DATASETS,
    KOLMOGOROV,
    RESULTS,
    fair_crps,
    literal,
    load,
    make_masks,
    save_panel,
    scores,
    table,
    write_atomic,
    z_prior,
)
from experiments.impute_world_column import WORLD, WORLD_GRID, WorldImputer  # noqa: E402

# ----------------------------------------------------------------------------- methods
OURS = "EOF+Matérn space-time (ours)"
TWISTED = "twisted SMC (diffusion, Gaussian oracle prior)"
SPATIAL = "EOF+Matérn spatial, exact (twisted's target)"
REPLACE = "replacement inpainting (same diffusion prior; biased)"
OI_PHYS = "Matérn OI, physical units"


def oi_ensemble(oi, obs: np.ndarray, clim: torch.Tensor, scale: torch.Tensor, k: int, rng):
    """``k`` Gaussian members ``(k, T, P)`` and the mean of per-step Matérn OI on the
    anomalies ``(obs - clim) / scale`` (NaN = hidden), back in physical units."""
    z = (torch.from_numpy(obs) - clim) / scale
    mu, var = zip(*[oi.predict(z[j]) for j in range(obs.shape[0])], strict=True)
    sc, cm = scale.numpy(), clim.numpy()
    mu = torch.stack(mu).numpy() * sc + cm
    sd = torch.stack(var).sqrt().numpy() * sc
    return mu[None] + sd * rng.standard_normal((k, *obs.shape)), mu


def run_dataset(
    name: str,
    seeds: list[int],
    k: int,
    masks: list[str],
    log,
    twisted: bool = True,
    twisted_max_points: int = 1000,
    spread: str = "window",
    ablations: tuple[str, ...] = ("fixed",),
    spatial: bool = True,
    linear: bool = True,
    world: dict | None = None,
    field_prior: bool = True,
    variants: tuple[str, ...] = (),
    validate: bool = False,
    panel_suffix: str = "",
    oi_physical: bool = False,
) -> list[dict]:
    da, mask = load(name)
    valid, lat, lon = field_points(da, mask)
    vals = np.asarray(da.values)[:, valid].astype(np.float64)
    groups, n_groups = season_index(da[da.dims[0]])
    t = vals.shape[0]
    n_fit = int(round(0.8 * t))
    fit, test = vals[:n_fit], vals[n_fit:]
    g_fit, g_test = torch.from_numpy(groups[:n_fit]), torch.from_numpy(groups[n_fit:])
    if validate:  # model selection: fit on the first 75 % of the fit period, test on the rest
        n_tr = int(0.75 * n_fit)
        fit, test = vals[:n_tr], vals[n_tr:n_fit]
        g_fit, g_test = torch.from_numpy(groups[:n_tr]), torch.from_numpy(groups[n_tr:n_fit])
        seeds = [1000 + s for s in seeds]
        n_fit = n_tr
    la, lo = torch.from_numpy(lat), torch.from_numpy(lon)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    clim_mean, clim_std = grouped_climatology(torch.from_numpy(fit), g_fit, n_groups)
    z_fit = ((torch.from_numpy(fit) - clim_mean[g_fit]) / clim_std).nan_to_num(0.0)
    geo = grid_geometry(da)
    oi = fit_residual(z_fit, la, lo, geo, generator=gen)
    t_oi = time.time() - t0
    ois = {"Matérn OI": (oi, clim_std)}
    if oi_physical:  # the same OI on anomalies in physical units (one common scale)
        phys = clim_std.mean().expand_as(clim_std)
        z_phys = ((torch.from_numpy(fit) - clim_mean[g_fit]) / phys).nan_to_num(0.0)
        ois[OI_PHYS] = (fit_residual(z_phys, la, lo, geo, generator=gen), phys)
    t0 = time.time()
    prior = None
    if field_prior:  # --no-prior skips it (its fit is the slow part on 64² grids)
        prior = fit_field_prior(
            torch.from_numpy(fit), g_fit, la, lo, n_groups, generator=gen, geometry=geo,
            spread=spread,
        )  # fmt: skip
    else:
        spatial = twisted = False
        ablations = ()
    t_prior = time.time() - t0
    priors = {OURS: prior} if prior is not None else {}
    for v in variants:  # separately fitted priors: "key=value,key=value" fit_field_prior kwargs
        kw = {"spread": spread}
        kw.update({a: literal(b) for a, b in (item.split("=") for item in v.split(","))})
        priors[f"{OURS} [{v}]"] = fit_field_prior(
            torch.from_numpy(fit), g_fit, la, lo, n_groups,
            generator=torch.Generator().manual_seed(0), geometry=geo, **kw,
        )  # fmt: skip
        pv = priors[f"{OURS} [{v}]"]
        log(
            f"  variant [{v}]: rank={pv.basis.shape[1]} length={pv.length:.3g} nugget="
            f"{pv.nugget} scale={pv.scale:.3f} resid_rho={pv.resid_rho:.2f} "
            f"hetero={pv.resid_sd is not None}"
        )
    for sp in ablations:  # the same prior with another spread model (same fit otherwise)
        priors[f"{OURS}, spread={sp}"] = dataclasses.replace(prior, spread=sp)
        priors[f"{OURS}, spread={sp}"]._cache, priors[f"{OURS}, spread={sp}"]._window = {}, None
        if sp != "fixed":
            priors[f"{OURS}, spread={sp}"].var_factor = holdout_variance_ratio(
                prior, z_prior(prior, fit, g_fit), int(0.75 * n_fit), gen, sp
            )
        else:
            priors[f"{OURS}, spread={sp}"].var_factor = 1.0
    log(
        f"[{name}] T={t} fit={n_fit} P={vals.shape[1]} groups={n_groups} | OI length="
        f"{oi.length:.3g} ({'km' if geo == 'sphere' else 'rad'}) nugget={oi.nugget} "
        f"scale={oi.scale:.2f} ({t_oi:.0f}s)"
    )
    if prior is not None:
        log(
            f"  prior rank={prior.basis.shape[1]} rho={prior.rho.numpy().round(2)[:6]} length="
            f"{prior.length:.3g} nugget={prior.nugget} scale={prior.scale:.2f} spread="
            f"{prior.spread} var_factor={prior.var_factor:.2f} resid_rho={prior.resid_rho:.2f} "
            f"hetero={prior.resid_sd is not None} ({t_prior:.0f}s)"
        )
    wimp = None
    if world is not None and name in KOLMOGOROV:
        tv = np.asarray(da[da.dims[0]].values)
        if np.issubdtype(tv.dtype, np.datetime64):  # simulated time t stored as t days
            tv = (tv - tv[0]) / np.timedelta64(1, "D")
        dt = float(np.median(np.diff(tv.astype(float))))
        wimp = WorldImputer(
            fit, valid.shape, dt, k, world["lag"], world["steps"], world["q"],
            world["n_val"], log, world.get("device", "cpu"),
        )  # fmt: skip
        wimp.tune(valid, masks, world["grid"], log)
    rows, panel = [], None
    cm = (clim_mean[g_test]).numpy()
    cs = clim_std.numpy()
    for kind in masks:
        for seed in seeds:
            hid = make_masks(valid, test.shape[0], kind, seed)
            hid &= np.isfinite(test)
            y = test[hid]
            obs = test.copy()
            obs[hid] = np.nan
            rng = np.random.default_rng(100 + seed)
            res = {}
            # climatology: N(m_month, s^2)
            ens = cm[None] + cs * rng.standard_normal((k, *test.shape))
            res["climatology"] = scores(ens[:, hid], cm[hid], y)
            # linear interpolation in space
            if linear:
                tt = time.time()
                li = np.stack([linear_interp(obs[j], lat, lon) for j in range(test.shape[0])])
                res["linear interp."] = scores(li[hid][None], li[hid], y)
                res["linear interp."]["time"] = time.time() - tt
            # Matérn OI on standardised anomalies, per step (and in physical units)
            for label, (oi_k, scale) in ois.items():
                tt = time.time()
                ens, mu = oi_ensemble(oi_k, obs, clim_mean[g_test], scale, k, rng)
                res[label] = scores(ens[:, hid], mu[hid], y)
                res[label]["time"] = time.time() - tt
            # dynamical smoother with the learned world over the whole test window
            if wimp is not None:
                tt = time.time()
                smp_w, mean_w = wimp.run(obs, seed, kind=kind)
                res[WORLD] = scores(smp_w[:, hid], mean_w[hid], y)
                res[WORLD]["time"] = time.time() - tt
            # Gaussian space-time prior (posterior over the test window in chunks of 12)
            for label, pr in priors.items():
                tt = time.time()
                g = torch.Generator().manual_seed(seed)
                sm, mn = impute_array(pr, torch.from_numpy(obs), g_test, k, g, window=12)
                res[label] = scores(sm.numpy()[:, hid], mn.numpy()[hid], y)
                res[label]["time"] = time.time() - tt
                if label == OURS:
                    smp, mean = sm, mn
            tt = time.time()
            g = torch.Generator().manual_seed(seed)
            if spatial:
                smp_s, mean_s = impute_array(prior, torch.from_numpy(obs), g_test, k, g, 1)
            if spatial:
                res[SPATIAL] = scores(smp_s.numpy()[:, hid], mean_s.numpy()[hid], y)
                res[SPATIAL]["time"] = time.time() - tt
            # the same Gaussian prior as a diffusion prior, conditioned by twisted SMC
            if twisted and vals.shape[1] <= twisted_max_points:
                tt = time.time()
                g = torch.Generator().manual_seed(seed)
                smp_t, mean_t = impute_array(
                    prior, torch.from_numpy(obs), g_test, k, g, window=1, method="twisted",
                    steps=64, particles=max(k, 64),
                )  # fmt: skip
                res[TWISTED] = scores(smp_t.numpy()[:, hid], mean_t.numpy()[hid], y)
                res[TWISTED]["time"] = time.time() - tt
                tt = time.time()
                g = torch.Generator().manual_seed(seed)
                smp_r, mean_r = impute_array(
                    prior, torch.from_numpy(obs), g_test, k, g, window=1,
                    method="replacement", steps=64,
                )  # fmt: skip
                res[REPLACE] = scores(smp_r.numpy()[:, hid], mean_r.numpy()[hid], y)
                res[REPLACE]["time"] = time.time() - tt
            for meth, sc in res.items():
                rows.append(dict(dataset=name, mask=kind, seed=seed, method=meth, **sc))
                log(
                    f"  {name:17s} {kind:4s} seed={seed} {meth:30s} crps={sc['crps']:.4f} "
                    f"rmse={sc['rmse']:.4f} cov={sc['cov']:.3f} t={sc.get('time', 0):.1f}s"
                )
            if kind == "box" and seed == seeds[0] and prior is None and wimp is not None:
                j = int(np.argmax(hid.sum(1)))
                panel = (valid, test[j], obs[j], mean_w[j], smp_w[:, j].std(0), smp_w[0, j])
            elif kind == "box" and seed == seeds[0] and prior is not None:
                j = int(np.argmax(hid.sum(1)))
                panel = (
                    valid,
                    test[j],
                    obs[j],
                    mean.numpy()[j],
                    smp.numpy()[:, j].std(0),
                    smp.numpy()[0, j],
                )
                if wimp is not None:  # second column: the dynamical smoother
                    panel = (*panel, mean_w[j], smp_w[:, j].std(0), smp_w[0, j])
    if panel is not None and not validate:
        save_panel(name, panel, panel_suffix)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, sst_anom only, K=16")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    ap.add_argument("--members", type=int, default=50)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument(
        "--no-twisted", action="store_true", help="skip the twisted-SMC diffusion column"
    )
    ap.add_argument(
        "--twisted-max-points",
        type=int,
        default=1000,
        help="run twisted SMC only on grids with at most this many valid points (1000: "
        "sst_anom; its cost grows like P^3 through the dense observation-space solves)",
    )
    ap.add_argument(
        "--spread",
        default="local",
        choices=("fixed", "window", "local"),
        help="posterior spread model of the prior (fit_field_prior(spread=...))",
    )
    ap.add_argument(
        "--ablations",
        nargs="*",
        default=["fixed"],
        help="also run the same prior with these spread models",
    )
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help="also fit the prior with these fit_field_prior options, e.g. hetero=False",
    )
    ap.add_argument(
        "--validate",
        action="store_true",
        help="model selection run: fit on the first 75 %% of the fit period, test on the "
        "rest of it (never the test window), mask seeds 1000 + seed",
    )
    ap.add_argument("--masks", nargs="+", default=["30%", "70%", "box"], help="mask kinds")
    ap.add_argument(
        "--oi-physical",
        action="store_true",
        help="also run Matérn OI on anomalies in physical units (kernel refitted by LOO CV)",
    )
    ap.add_argument("--no-spatial", action="store_true", help="skip the window=1 column")
    ap.add_argument(
        "--no-linear", action="store_true", help="skip linear interpolation (slow on big grids)"
    )
    ap.add_argument(
        "--no-world",
        action="store_true",
        help="skip the dynamical EnKS with the learned world (Kolmogorov datasets only)",
    )
    ap.add_argument(
        "--world-grid",
        default=WORLD_GRID,
        help="radius:additive settings (taper radius in grid units, additive factor of the "
        "static covariance) tried on the held-out fit frames",
    )
    ap.add_argument("--device", default="cpu", help="device of the world column (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: benchmarks)")
    ap.add_argument(
        "--no-prior",
        action="store_true",
        help="skip the EOF+Matérn prior and its rows (its fit is slow on 64² grids)",
    )
    ap.add_argument("--world-lag", type=int, default=4, help="smoother lag (world steps)")
    ap.add_argument("--world-steps", type=int, default=3, help="diffusion steps per world step")
    ap.add_argument("--world-q", type=float, default=0.6, help="world model-error level q")
    ap.add_argument("--world-val", type=int, default=24, help="last fit frames held out for tuning")
    ap.add_argument(
        "--merge",
        nargs="*",
        default=None,
        help="only merge these CSVs into bench_impute.md and exit",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    dsets = ["sst_anom"] if args.quick else args.datasets
    k = 16 if args.quick else args.members
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        import pandas as pd

        rows = pd.concat([pd.read_csv(f) for f in args.merge]).to_dict("records")
        md = f"# bench_impute (means over seeds, K={args.members})\n\n{table(rows)}\n"
        write_atomic(RESULTS / "bench_impute.md", md)
        print(table(rows))
        return 0
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    logf = open(RESULTS / f"bench_impute{suffix}.log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    world = None
    if not args.no_world:
        world = dict(
            lag=args.world_lag, steps=args.world_steps,
            q=args.world_q, n_val=args.world_val, grid=args.world_grid,
            device=args.device,
        )  # fmt: skip
    log(f"command: python experiments/bench_impute.py {' '.join(argv or sys.argv[1:])}")
    rows = []
    for name in dsets:
        rows += run_dataset(
            name, seeds, k, args.masks, log, not args.no_twisted,
            args.twisted_max_points, args.spread, tuple(args.ablations), not args.no_spatial,
            not args.no_linear, world, not args.no_prior, tuple(args.variants), args.validate,
            suffix, args.oi_physical,
        )  # fmt: skip
    import pandas as pd

    write_atomic(RESULTS / f"bench_impute{suffix}.csv", pd.DataFrame(rows).to_csv(index=False))
    md = table(rows)
    write_atomic(
        RESULTS / f"bench_impute{suffix}.md",
        f"# bench_impute{suffix} (means over seeds {seeds}, K={k})\n\n{md}\n",
    )
    log(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
