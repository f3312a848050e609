"""BENCHMARKS.md E (anomaly detection): z-score and leave-one-out OI residual baselines
against the scores of :mod:`assim.anomaly` (evidence, imputation, DTE).

Protocol: fit on the first 80 % of time steps; into the test fields inject, one type at
a time, spikes (±5 local climatological std at 1 % of points), a level shift (+2 std on
a box of a tenth of the domain for 3 steps), a drifting sensor (3x3 block drifting
linearly to +3 std over 6 steps) and a frozen field (one step repeats the previous
one); score every grid point and time; AUROC, AUPRC (average precision), best F1 per
type; seeds 0, 1, 2. ``evidence`` runs with background QC (``--qc``), the persistence
scan (``--persist``) and its statistics calibrated on the fit period (unless
``--no-calibrate``); ``evidence0`` is the historical score (none of the three).

    python experiments/bench_anomaly.py [--quick] [--datasets ...] [--methods ...]

Datasets as in ``bench_impute.py``, including ``kolmogorov32`` / ``kolmogorov64``
(simulated vorticity; "local climatological std" = the per-point std of the fit period).

Writes ``experiments/results/bench_anomaly.{md,csv}`` and ``anomaly_<dataset>.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assim.anomaly import dte_scores, evidence_scores, imputation_scores  # noqa: E402
from assim.anomaly_qc import SCAN, calibrate_evidence  # noqa: E402
from assim.impute import field_points, fit_field_prior, grid_geometry, season_index  # noqa: E402
from assim.impute_prior import fit_residual  # noqa: E402
from experiments.impute_common import (  # noqa: E402
    DATASETS,
    RESULTS,
    load,
    mean_table,
    random_box,
)

TYPES = ("spike", "level shift", "drift", "frozen")


def inject(test: np.ndarray, std: np.ndarray, valid: np.ndarray, kind: str, seed: int):
    """Return ``(corrupted (T, P), labels (T, P) bool)``; ``std`` ``(P,)``."""
    rng = np.random.default_rng(seed)
    x, lab = test.copy(), np.zeros(test.shape, bool)
    t, p = test.shape
    if kind == "spike":
        lab = rng.random((t, p)) < 0.01
        sign = rng.choice([-1.0, 1.0], size=(t, p))
        x[lab] += (5 * sign * std)[lab]
    elif kind in ("level shift", "drift"):
        nlat, nlon = valid.shape
        if kind == "level shift":
            blat, blon, steps = max(1, round(nlat * 0.1**0.5)), max(1, round(nlon * 0.1**0.5)), 3
        else:
            blat, blon, steps = 3, 3, 6
        box = random_box(valid, blat, blon, rng, tries=200, min_valid=0.6)
        pts = box[valid]
        k0 = rng.integers(1, t - steps + 1)
        for j in range(steps):
            amp = 2.0 if kind == "level shift" else 3.0 * (j + 1) / steps
            x[k0 + j, pts] += amp * std[pts]
            lab[k0 + j, pts] = True
    elif kind == "frozen":
        k = rng.integers(1, t)
        x[k] = x[k - 1]
        lab[k] = True
    else:
        raise ValueError(kind)
    return x, lab


def auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUROC with midranks for ties."""
    from scipy.stats import rankdata

    r = rankdata(s)
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auprc_f1(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Average precision and the best F1 over thresholds (ties grouped)."""
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    tp = np.cumsum(yy)
    last = np.r_[ss[1:] != ss[:-1], True]  # end of each tie group
    tp, k = tp[last], np.arange(1, len(s) + 1)[last]
    prec, rec = tp / k, tp / y.sum()
    ap = float(np.sum(np.diff(np.r_[0, rec]) * prec))
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0)
    return ap, float(f1.max())


def run_dataset(name, seeds, methods, log, qc=4.0, persist=3, calibrate=True, scan=SCAN):
    da, mask = load(name)
    valid, lat, lon = field_points(da, mask)
    vals = np.asarray(da.values)[:, valid].astype(np.float64)
    if np.isnan(vals).any():  # a few points missing at some steps: climatological fill
        vals = np.where(np.isnan(vals), np.nanmean(vals, 0), vals)
    groups, n_groups = season_index(da[da.dims[0]])
    n_fit = int(round(0.8 * vals.shape[0]))
    g = torch.from_numpy(groups)
    la, lo = torch.from_numpy(lat), torch.from_numpy(lon)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    geo = grid_geometry(da)
    prior = fit_field_prior(
        torch.from_numpy(vals[:n_fit]), g[:n_fit], la, lo, n_groups, generator=gen, geometry=geo
    )
    z_fit = prior.standardize(torch.from_numpy(vals[:n_fit]), g[:n_fit])
    oi = fit_residual(z_fit, la, lo, geo, generator=gen)
    log(f"[{name}] fitted prior (rank {prior.basis.shape[1]}) and OI in {time.time() - t0:.0f}s")
    # OI precision once: LOO residual r_i / sqrt(var_i) = (Q z)_i / sqrt(Q_ii)
    # (the same statistic as assim.baselines.oi_loo_residual, without refactorising)
    q_oi = torch.cholesky_inverse(torch.linalg.cholesky(oi.cov()))
    scales = None
    if calibrate and "evidence" in methods:
        t0 = time.time()
        scales = calibrate_evidence(
            prior, torch.from_numpy(vals[:n_fit]), g[:n_fit], valid, qc, scan
        )
        log(f"[{name}] evidence calibration on the fit period ({time.time() - t0:.0f}s): {scales}")
    # test window with one fit step in front (the predecessor of the first test step)
    ctx = vals[n_fit - 1 :]
    g_ctx = g[n_fit - 1 :]
    std = prior.clim_std.numpy()
    rows, panel = [], None
    for kind in TYPES:
        for seed in seeds:
            x_test, lab = inject(ctx[1:], std, valid, kind, seed)
            x = torch.from_numpy(np.r_[ctx[:1], x_test])
            z = prior.standardize(x, g_ctx)
            sc = {
                "z-score": z[1:].abs(),
                "OI residual": (z[1:] @ q_oi).abs() / torch.diagonal(q_oi).sqrt(),
            }
            tt = {}
            for m in methods:
                t1 = time.time()
                if m == "evidence":
                    sc[m] = evidence_scores(prior, x, g_ctx, valid, qc, persist, scales, scan)[1:]
                elif m == "evidence0":  # without QC, persistence test and calibration
                    sc[m] = evidence_scores(prior, x, g_ctx, valid, None, 1)[1:]
                elif m == "imputation":
                    gi = torch.Generator().manual_seed(seed)
                    sc[m] = imputation_scores(prior, x, g_ctx, generator=gi)[1:]
                elif m == "dte":
                    sc[m] = dte_scores(prior, x, g_ctx)[0][1:]
                tt[m] = time.time() - t1
            y = lab.ravel()
            for meth, s in sc.items():
                s = np.nan_to_num(s.numpy().ravel(), nan=0.0, posinf=1e300)
                ap, f1 = auprc_f1(s, y)
                rows.append(
                    dict(
                        dataset=name,
                        type=kind,
                        seed=seed,
                        method=meth,
                        auroc=auroc(s, y),
                        auprc=ap,
                        f1=f1,
                        time=tt.get(meth, 0.0),
                    )
                )
                r = rows[-1]
                log(
                    f"  {name:17s} {kind:11s} seed={seed} {meth:12s} AUROC={r['auroc']:.3f} "
                    f"AUPRC={r['auprc']:.3f} F1={r['f1']:.3f} t={r['time']:.1f}s"
                )
            if kind == "drift" and seed == seeds[0] and "evidence" in sc:
                k = int(np.argmax(lab.sum(1)))
                panel = (valid, x_test[k], sc["evidence"][k].numpy(), lab[k])
    if panel is not None:
        save_panel(name, panel)
    return rows


def save_panel(name, panel) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid, field, score, lab = panel
    fig, axes = plt.subplots(3, 1, figsize=(8, 6))
    for ax, f, title in zip(
        axes,
        (field, score, lab.astype(float)),
        ("field with drift", "evidence score (-log10 p)", "labels"),
        strict=True,
    ):
        gg = np.full(valid.shape, np.nan)
        gg[valid] = f
        im = ax.imshow(gg, origin="lower", aspect="auto")
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(RESULTS / f"anomaly_{name}.png", dpi=80)
    plt.close(fig)


def table(rows) -> str:
    """Markdown table of the mean AUROC, AUPRC, best F1 and time per dataset, type, method."""
    cols = {"auroc": "AUROC:.3f", "auprc": "AUPRC:.3f", "f1": "best F1:.3f", "time": "time (s):.1f"}
    return mean_table(rows, ["dataset", "type", "method"], cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, sst_anom, evidence+dte")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=["evidence", "imputation", "dte"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--qc", type=float, default=4.0, help="evidence QC threshold (sd); 0 = off")
    ap.add_argument("--persist", type=int, default=3, help="evidence persistence window")
    ap.add_argument(
        "--scan",
        type=lambda v: tuple(int(r) for r in v.split(",")),
        default=SCAN,
        help=f"block radii of the persistence scan (default {','.join(map(str, SCAN))})",
    )
    ap.add_argument(
        "--no-calibrate", action="store_true", help="evidence without fit-period calibration"
    )
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument(
        "--merge",
        nargs="*",
        default=None,
        help="only merge these CSVs into bench_anomaly.md and exit",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    dsets = ["sst_anom"] if args.quick else args.datasets
    methods = ["evidence", "dte"] if args.quick else args.methods
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        import pandas as pd

        rows = pd.concat([pd.read_csv(f) for f in args.merge]).to_dict("records")
        (RESULTS / "bench_anomaly.md").write_text(
            f"# bench_anomaly (means over seeds)\n\n{table(rows)}\n"
        )
        print(table(rows))
        return 0
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    logf = open(RESULTS / f"bench_anomaly{suffix}.log", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    rows = []
    for name in dsets:
        qc = args.qc if args.qc > 0 else None
        rows += run_dataset(
            name, seeds, methods, log, qc, args.persist, not args.no_calibrate, args.scan
        )
    import pandas as pd

    pd.DataFrame(rows).to_csv(RESULTS / f"bench_anomaly{suffix}.csv", index=False)
    md = table(rows)
    (RESULTS / f"bench_anomaly{suffix}.md").write_text(
        f"# bench_anomaly{suffix} (means over seeds {seeds})\n\n{md}\n"
    )
    log(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
