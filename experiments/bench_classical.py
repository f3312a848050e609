"""BENCHMARKS.md table A: classical filters on Lorenz-96 / Lorenz-63 next to DAPPER's
reference figures.

Protocol (DAPPER's): the truth starts from one draw of ``X0`` (L96: ``N(e_1, 0.001 I)``,
i.e. near ``(1, 0, ..., 0)``; L63: ``N((1.509, -1.531, 25.46), 2 I)``) and is integrated
without model noise; the initial ensemble is an independent draw of ``N`` members of
``X0``; the first ``burn_in`` cycles (L96 500, L63 200) are not scored -- they are the
spin-up. ``rmse.a`` is the plain time mean over scored cycles of the spatial RMS error of
the analysis mean (:func:`assim.metrics.rmse_a`). A run *diverges* when
``rmse.a > clim_spread / 2`` (``clim_spread`` = RMS temporal std of the truth). Each
seed draws its own truth, observations and initial ensemble; all methods of a seed see
the same truth and observations. Timings: wall clock of the whole forecast + analysis
loop, one torch thread.

    python experiments/bench_classical.py            # full table (long)
    python experiments/bench_classical.py --quick    # smoke run, < 60 s
    python experiments/bench_classical.py --only L96-std --methods ETKF

Writes ``experiments/results/classical{_quick}.md`` / ``.csv`` / ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assim.filters.base import Ensemble  # noqa: E402
from assim.filters.enkf import make_filter  # noqa: E402
from assim.filters.pf import BootstrapPF  # noqa: E402
from assim.metrics import rmse_a  # noqa: E402
from assim.obs import Arctan, Cubic, GaussianNoise, Identity, Observation, Subset  # noqa: E402
from experiments.atomic import write_atomic  # noqa: E402
from experiments.classical_settings import L63_X0, SETTINGS, Method, Setting, _pf  # noqa: E402,F401
from models.worlds.physical import physical_world  # noqa: E402

F64 = torch.float64
RESULTS = Path(__file__).resolve().parent / "results"


def x0_mean_var(system: str) -> tuple[torch.Tensor, float]:
    """DAPPER's ``X0``: L96 ``N(e_1, 0.001)``; L63 ``N(x0, 2)``."""
    if system == "l96":
        mu = torch.zeros(40, dtype=F64)
        mu[0] = 1.0
        return mu, 0.001
    return torch.tensor(L63_X0, dtype=F64), 2.0


def observation(s: Setting) -> Observation:
    noise = GaussianNoise(var=s.sigma2)
    op = {
        "identity": Identity(),
        "every4": Subset(every=4),
        "arctan": Arctan(),
        "cubic": Cubic(),
    }[s.obs]
    return Observation(op, noise)


def simulate(s: Setting, seed: int, cycles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth ``(K, d)`` at observation times and observations ``(K, m)``."""
    world = physical_world(s.system)
    mu, var = x0_mean_var(s.system)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = (mu + math.sqrt(var) * torch.randn(mu.shape, generator=g, dtype=F64)).unsqueeze(0)
    truth = torch.empty(cycles, mu.numel(), dtype=F64)
    for k in range(cycles):
        for _ in range(s.dko):
            x = world.step(x)
        truth[k] = x[0]
    obs = observation(s)
    ys = obs.sample(truth, generator=torch.Generator().manual_seed(20_000 + seed))
    return truth, ys


def run_filter(m: Method, s: Setting, truth, ys, seed: int) -> tuple[np.ndarray, float]:
    """Analysis means ``(K, d)`` and wall time of the loop."""
    world = physical_world(s.system)
    obs = observation(s)
    mu, var = x0_mean_var(s.system)
    g = torch.Generator().manual_seed(30_000 + seed)
    x = mu + math.sqrt(var) * torch.randn(m.n, mu.numel(), generator=g, dtype=F64)
    filt = BootstrapPF(**m.opts) if m.kind == "pf" else make_filter(m.kind, **m.opts)
    ens = Ensemble(x)
    means = np.full(truth.shape, np.nan)
    t0 = time.perf_counter()
    for k in range(truth.shape[0]):
        xk = ens.x
        for _ in range(s.dko):
            xk = world.step(xk)
        ens, _ = filt.analysis(Ensemble(xk, ens.log_w), ys[k], obs, generator=g)
        mean = ens.mean()
        if not bool(torch.isfinite(mean).all()):
            break  # blown up: the unscored rest stays NaN and counts as diverged
        means[k] = mean.numpy()
    return means, time.perf_counter() - t0


def run_static(m: Method, s: Setting, truth, ys, clim_mu, clim_cov) -> tuple[np.ndarray, float]:
    """Climatology, optimal interpolation (climatological prior each cycle) and 3D-Var
    (the previous analysis forecast as prior, ``B = xB * climatological covariance``)."""
    t0 = time.perf_counter()
    K = truth.shape[0]
    if m.kind == "clim":
        return np.tile(clim_mu.numpy(), (K, 1)), time.perf_counter() - t0
    obs = observation(s)
    if not obs.linear:
        raise ValueError(f"{m.label} needs a linear observation operator")
    H = obs.operator.matrix((clim_mu.numel(),), dtype=F64)
    R = obs.noise.covariance(H.shape[0]).to(F64)
    B = clim_cov * m.opts.get("xB", 1.0)
    Kg = torch.linalg.solve(H @ B @ H.T + R, H @ B).T
    means = np.empty(truth.shape)
    world = physical_world(s.system)
    xa = clim_mu.unsqueeze(0)
    for k in range(K):
        if m.kind == "oi":
            xf = clim_mu
        else:
            xf = xa
            for _ in range(s.dko):
                xf = world.step(xf)
            xf = xf[0]
        xa = (xf + Kg @ (ys[k] - H @ xf)).unsqueeze(0)
        means[k] = xa[0].numpy()
    return means, time.perf_counter() - t0


def summarise(vals: list[float], thresh: float) -> tuple[str, int]:
    a = np.array(vals)
    div = int(np.sum(~np.isfinite(a) | (a > thresh)))
    fin = a[np.isfinite(a)]
    if fin.size == 0:
        return "nan", div
    med = np.median(fin)
    txt = f"{med:.3g}" if len(a) == 1 else f"{med:.3g} [{fin.min():.3g}, {fin.max():.3g}]"
    return txt, div


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['setting']}\n{r['method'].split(' infl')[0]}" for r in rows]
    ours = [r["median"] for r in rows]
    refs = []
    for r in rows:
        try:
            refs.append(float(str(r["reference"]).split()[0].split("-")[0]))
        except (ValueError, IndexError):  # no reference figure, or a text one
            refs.append(np.nan)
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4.5))
    ax.bar(xs - 0.2, ours, 0.4, label="ours (median of seeds)")
    ax.bar(xs + 0.2, refs, 0.4, label="DAPPER reference")
    ax.set_yscale("log")
    ax.set_ylabel("rmse.a")
    ax.set_xticks(xs, labels, rotation=75, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_outputs(rows: list[dict], tag: str, seeds: int) -> None:
    """Print and atomically write ``classical{tag}.md`` / ``.csv`` / ``.png``."""
    noted = "note" in rows[0]
    head = (
        "| setting | method | rmse.a median [range] | diverged | cycles/s | cycles | "
        "DAPPER reference |"
        + (" run |" if noted else "")
        + "\n|---|---|---|---|---|---|---|"
        + ("---|" if noted else "")
        + "\n"
    )
    body = "".join(
        f"| {r['setting']} | {r['method']} | {r['rmse_a']} | {r['diverged']} | "
        f"{r['cycles_per_s']:.0f} | {r['cycles']} | {r['reference']} |"
        + (f" {r['note']} |" if noted else "")
        + "\n"
        for r in rows
    )
    note = (
        f"\n{seeds} seed(s); burn-in as BENCHMARKS.md A; divergence = rmse.a > half the "
        "climatological spread; torch, 1 thread, float64.\n"
    )
    md = "# Classical filters (BENCHMARKS.md A)\n\n" + head + body + note
    print("\n" + md)
    write_atomic(RESULTS / f"classical{tag}.md", md.encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(RESULTS / f"classical{tag}.csv", buf.getvalue().encode())
    plot(rows, RESULTS / f"classical{tag}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 cycles, 1 seed, small PFs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="setting ids")
    p.add_argument("--methods", nargs="*", default=None, help="substrings of method labels")
    p.add_argument("--pf-cycles", type=int, default=None, help="cap cycles of PF rows")
    p.add_argument("--cycles", type=int, default=None, help="cycles of every row")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="TAG",
        help="only merge the CSVs of earlier runs with these tags into classical.*",
    )
    args = p.parse_args(argv)
    if args.merge:
        rows = []
        for t in args.merge:
            with open(RESULTS / f"classical_{t}.csv", newline="") as f:
                rows += list(csv.DictReader(f))
        order = {sid: i for i, sid in enumerate(SETTINGS)}
        rows.sort(key=lambda r: order.get(r["setting"], 99))
        for r in rows:
            r["median"], r["cycles_per_s"] = float(r["median"]), float(r["cycles_per_s"])
        write_outputs(rows, "", args.seeds)
        return 0
    torch.set_num_threads(1)
    torch.set_default_dtype(F64)
    RESULTS.mkdir(parents=True, exist_ok=True)
    seeds = 1 if args.quick else args.seeds
    rows = []
    for sid in args.only or list(SETTINGS):
        if sid not in SETTINGS:
            p.error(f"--only: unknown setting {sid!r}; known: {sorted(SETTINGS)}")
        s = SETTINGS[sid]
        full_k = 200 if args.quick else (args.cycles or s.cycles)
        burn = 50 if args.quick else s.burn_in
        seed_ids = range(args.first_seed, args.first_seed + seeds)
        data = [simulate(s, seed, full_k) for seed in seed_ids]
        clim_spread = float(torch.stack([t[burn:].std(0) for t, _ in data]).pow(2).mean().sqrt())
        for m in s.methods:
            if args.methods and not any(q.lower() in m.label.lower() for q in args.methods):
                continue
            if args.quick and m.kind == "pf":
                m = Method(m.label + " (quick: N=100)", "pf", 100, m.opts, m.ref)
            vals, speeds, ks = [], [], []
            for seed, (truth, ys) in zip(seed_ids, data, strict=True):
                k = full_k
                if m.kind == "pf" and args.pf_cycles:
                    k = min(k, args.pf_cycles)
                truth_k, ys_k = truth[:k], ys[:k]
                if m.kind in ("clim", "oi", "var3d"):
                    mu = truth[burn:].mean(0)
                    cov = torch.cov(truth[burn:].T)
                    means, wall = run_static(m, s, truth_k, ys_k, mu, cov)
                else:
                    means, wall = run_filter(m, s, truth_k, ys_k, seed)
                score = rmse_a(torch.as_tensor(means), truth_k, burn_in=burn)
                vals.append(score if np.isfinite(means).all() else math.inf)
                speeds.append(k / wall)
                ks.append(k)
            txt, div = summarise(vals, clim_spread / 2)
            fin = [v for v in vals if np.isfinite(v)]
            row = {
                "setting": sid,
                "method": m.label,
                "rmse_a": txt,
                "median": float(np.median(fin)) if fin else math.nan,
                "seeds": ";".join(f"{v:.4g}" for v in vals),
                "diverged": "n/a" if m.kind in ("clim", "oi") else f"{div}/{len(vals)}",
                "cycles_per_s": float(np.median(speeds)),
                "cycles": ks[0],
                "reference": m.ref,
            }
            rows.append(row)
            print(
                f"{sid:16s} {m.label:38s} rmse.a {txt:28s} div {row['diverged']} "
                f"{row['cycles_per_s']:8.1f} cyc/s  ref {m.ref}",
                flush=True,
            )
    tag = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    write_outputs(rows, tag, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
