"""Function-space world on 2-D Kolmogorov flow: train on one grid, forecast on others.

Data: the Kolmogorov simulator of ``models.physics`` (64², Re 1000, k_f 4, drag 0.1 —
the ``kolmogorov64`` catalogue setup), snapshots every 0.2 time units after a spin-up
of 20 units; the training grid is the 64² vorticity block-averaged to ``--train-n``
(default 32²). Training uses ``models.train.train_world`` with
``world="function_space"`` (FNO, Matérn GP noise on the 2π-periodic square).

Evaluation (BENCHMARKS.md D metrics): held-out trajectories (another seed); from ICs
4 time units apart an analysis ensemble (centre = truth + N(0, sigma_a^2) on 64², members
= centre + N(0, sigma_a^2), block-averaged to each grid); the *same* world regridded to
16², 32² and 64² forecasts 10 steps (2 time units). Baselines per grid: the true model
(64² simulator from the 64² members, block-averaged), persistence, climatology
(training snapshots). Also the isotropic enstrophy spectrum of the lead-5 forecasts
against the truth's, per grid (slope over the upper half of the resolved wave numbers).

Usage: ``python experiments/bench_function_space_kolmogorov.py [--minutes 8] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forecast import RESULTS, metrics  # noqa: E402

import models  # noqa: E402
from models.physics import Kolmogorov  # noqa: E402
from models.train import TrainConfig, train_world  # noqa: E402

DT, SUB = 0.2, 20


def simulate(seed: int, n_traj: int, n_snap: int) -> torch.Tensor:
    """``(n_traj, n_snap, 64, 64)`` vorticity snapshots every ``DT`` after spin-up."""
    sim = Kolmogorov(64)
    g = torch.Generator().manual_seed(seed)
    w = sim.random_state(n_traj, g)
    for _ in range(100 * SUB):
        w = sim.step(w, DT / SUB)
    out = []
    for _ in range(n_snap):
        for _ in range(SUB):
            w = sim.step(w, DT / SUB)
        out.append(w)
    return torch.stack(out, 1)


def run_model(w: torch.Tensor, n_snap: int) -> torch.Tensor:
    """True-model forecasts ``(B, n_snap, 64, 64)`` from ``w`` ``(B, 64, 64)``."""
    sim, out = Kolmogorov(64), []
    for _ in range(n_snap):
        for _ in range(SUB):
            w = sim.step(w, DT / SUB)
        out.append(w)
    return torch.stack(out, 1)


def coarsen(x: torch.Tensor, n: int) -> torch.Tensor:
    """Block mean of ``(..., 64, 64)`` to ``(..., n, n)``."""
    f = x.shape[-1] // n
    return x.reshape(*x.shape[:-2], n, f, n, f).mean((-3, -1))


def spectrum_slope(x: torch.Tensor) -> float:
    """Slope of the isotropic enstrophy spectrum of ``(..., n, n)`` fields over shells
    ``n/8 <= |k| < n/3`` (log-log least squares; the 64² simulator is dealiased by the 2/3
    rule, so shells beyond n/3 are empty there)."""
    n = x.shape[-1]
    p = torch.fft.fft2(x.double(), norm="ortho").abs().pow(2).reshape(-1, n, n).mean(0)
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    kk = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long()
    shells = torch.arange(max(2, n // 8), n // 3)
    e = torch.stack([p[kk == s].sum() for s in shells])
    lk, le = shells.double().log(), e.log()
    return float(((lk - lk.mean()) * (le - le.mean())).sum() / ((lk - lk.mean()) ** 2).sum())


def train(args: argparse.Namespace, out: Path) -> None:
    data = coarsen(simulate(64, args.train_traj, args.train_snap), args.train_n)
    n = args.train_n
    coords = np.arange(n) * 2 * math.pi / n
    ds = xr.Dataset(
        {"vorticity": (("member", "time", "y", "x"), data.numpy())},
        coords={"time": np.arange(data.shape[1]) * DT, "y": coords, "x": coords},
    )
    cfg = TrainConfig(
        out=str(out),
        world="function_space",
        sample_dim="member",
        dt=DT,
        target="increment",
        normalise="global",
        backbone="fno",
        backbone_kwargs={"modes": [8, 8], "width": 32, "depth": 4},
        world_kwargs={"lengths": [2 * math.pi, 2 * math.pi], "lengthscale": 0.5, "nu": 1.5},
        schedule="edm",
        schedule_kwargs={"sigma_max": 20.0},
        diffusion_steps=5,
        batch_size=32,
        lr=2e-3,
        ema_decay=0.999,
        val_fraction=0.1,
        epochs=100000,
        max_minutes=args.minutes,
        progress=False,
        seed=0,
    )
    train_world(cfg, data=ds, meta={"data": f"Kolmogorov 64^2 block-averaged to {n}^2"})


def evaluate(args: argparse.Namespace, path: Path) -> dict:
    world = models.load(path)
    truth = simulate(7, args.eval_traj, args.leads + 20 * args.ics)  # held-out seed
    gap = 20  # 4 time units between ICs
    g = torch.Generator().manual_seed(1)
    ics, fut = [], []
    for b in range(truth.shape[0]):
        for i in range(args.ics):
            ics.append(truth[b, i * gap])
            fut.append(truth[b, i * gap + 1 : i * gap + 1 + args.leads])
    ics, fut = torch.stack(ics), torch.stack(fut)  # (B, 64, 64), (B, L, 64, 64)
    sig = args.sigma_a * float(ics.std())
    centre = ics + sig * torch.randn(ics.shape, generator=g)
    mem = centre[:, None] + sig * torch.randn((ics.shape[0], args.members, 64, 64), generator=g)
    b, m, lead = ics.shape[0], args.members, args.leads
    tm = run_model(mem.reshape(-1, 64, 64), lead).reshape(b, m, lead, 64, 64)
    clim_pool = coarsen(simulate(64, 2, 40), 64).reshape(-1, 64, 64)
    res = {
        "grids": {},
        "sigma_a": sig,
        "train": {k: world.meta.get(k) for k in ("global_steps", "train_seconds")},
    }
    for n in args.grids:
        wn = world.regrid((n, n)) if n != world.state_shape[0] else world
        x0 = coarsen(mem, n).reshape(-1, n, n)
        t0 = time.perf_counter()
        fc = wn.forecast(x0, lead, members=x0.shape[0], generator=torch.Generator().manual_seed(2))
        secs = time.perf_counter() - t0
        fc = fc.reshape(b, m, lead, n * n)
        tr = coarsen(fut, n).reshape(b, lead, n * n)
        idx = torch.randint(0, clim_pool.shape[0], (b, m), generator=g)
        rows = {
            "function_space": metrics(fc, tr),
            "true model": metrics(coarsen(tm, n).reshape(b, m, lead, n * n), tr),
            "persistence": metrics(
                coarsen(mem, n).reshape(b, m, 1, n * n).expand(-1, -1, lead, -1), tr
            ),
            "climatology": metrics(
                coarsen(clim_pool[idx], n).reshape(b, m, 1, n * n).expand(-1, -1, lead, -1), tr
            ),
        }
        k5 = min(4, lead - 1)
        res["grids"][n] = {
            "per_lead": {k: {q: v.tolist() for q, v in r.items()} for k, r in rows.items()},
            "seconds": secs,
            "slope_world": spectrum_slope(fc[:, :, k5].reshape(-1, n, n)),
            "slope_truth": spectrum_slope(tr[:, k5].reshape(-1, n, n)),
        }
    return res


def table(res: dict, leads: int) -> str:
    picks = sorted({1, leads // 2, leads})
    head = " | ".join(f"RMSE/CRPS/SS @{k * DT:.1f}" for k in picks)
    lines = [f"| grid | method | {head} |", "|---" * (len(picks) + 2) + "|"]
    for n, r in res["grids"].items():
        for name, mt in r["per_lead"].items():
            cells = [
                " / ".join(f"{mt[q][k - 1]:.3f}" for q in ("rmse", "crps", "spread_skill"))
                for k in picks
            ]
            lines.append(f"| {n}² | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| grid | enstrophy-spectrum slope (lead 1.0): world / truth | forecast s |",
        "|---|---|---|",
    ]
    for n, r in res["grids"].items():
        lines.append(
            f"| {n}² | {r['slope_world']:.2f} / {r['slope_truth']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    from assim.datasets import resolve_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(resolve_cache_dir() / "worlds2" / "kolmogorov_fs.pt"))
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--train-n", type=int, default=32)
    p.add_argument("--train-traj", type=int, default=8)
    p.add_argument("--train-snap", type=int, default=150)
    p.add_argument("--eval-traj", type=int, default=2)
    p.add_argument("--ics", type=int, default=3)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--leads", type=int, default=10)
    p.add_argument("--sigma-a", type=float, default=0.1, help="IC error, fraction of std")
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.quick:
        a.minutes, a.train_traj, a.train_snap, a.ics, a.members, a.leads = 0.3, 2, 20, 1, 4, 3
    ckpt = Path(a.ckpt)
    if not a.skip_train:
        train(a, ckpt)
    res = evaluate(a, ckpt)
    text = table(res, a.leads)
    stem = f"bench_function_space_kolmogorov{'_quick' if a.quick else ''}"
    header = (
        f"# {stem}\n\n`python experiments/bench_function_space_kolmogorov.py"
        f"{' --quick' if a.quick else ''}` — trained on {a.train_n}² for {a.minutes} min "
        f"({res['train']['global_steps']} steps), evaluated on {a.grids}; "
        f"{a.eval_traj * a.ics} ICs x {a.members} members, sigma_a = {res['sigma_a']:.3f}; "
        "torch threads 1.\n\nCells: RMSE / fair CRPS / spread-skill at the lead (time units).\n\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(header + text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print(header + text)


if __name__ == "__main__":
    main()
