"""BENCHMARKS.md D on Lorenz-96: ensemble forecast skill of the conditional world.

Protocol: truths are held-out Lorenz-96 trajectories (40 variables, F = 8,
dt = 0.05) from seeds 0, 1, 2 (the shipped checkpoint was trained on seed 9601).
From ``--ics`` states per seed, 1 MTU apart, each method makes a 16-member
forecast up to 2 MTU (40 steps) from a calibrated "analysis" ensemble: mean
``a = truth + N(0, sigma_a^2)``, members ``a + N(0, sigma_a^2)`` (so the truth is
statistically one more member; ``sigma_a = 0.2``, about the analysis error of a
good filter on L96-std).

Methods: the conditional diffusion world (checkpoint, its default inference
options, and ``q`` as given), the true model from the same perturbed ICs,
persistence (each member keeps its IC) and climatology (16 states drawn from a
long independent run, the same at every lead).

Metrics per lead, pooled over ICs, seeds and grid points: RMSE of the ensemble
mean, fair CRPS (Ferro 2014; ``assim.metrics.crps_ensemble``) and spread/skill =
sqrt(mean unbiased ensemble variance) / RMSE. Prints a markdown table and writes
it with a PNG of the curves to ``experiments/results/``.

Usage: ``python experiments/bench_forecast.py [--quick] [--world CKPT] [--q 0.0]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import models
from assim.metrics import crps_ensemble
from models.physics import Lorenz96
from models.worlds.physical import physical_world

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MEMBERS, SIGMA_A, DT = 16, 0.2, 0.05


def metrics(fc: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    """``fc`` ``(B, M, L, n)``, ``truth`` ``(B, L, n)`` -> per-lead arrays ``(L,)``."""
    err2 = ((fc.mean(1) - truth) ** 2).mean((0, 2))
    var = fc.var(1, unbiased=True).mean((0, 2))
    crps = crps_ensemble(fc, truth, member_dim=1).mean((0, 2))
    rmse = err2.sqrt()
    return {"rmse": rmse.numpy(), "crps": crps.numpy(), "spread_skill": (var.sqrt() / rmse).numpy()}


def truths(seed: int, n_ics: int, leads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ICs ``(n_ics, 40)`` 1 MTU apart and their true futures ``(n_ics, leads, 40)``."""
    sim = Lorenz96(40, 8.0)
    g = torch.Generator().manual_seed(seed)
    x0 = sim.random_state(1, g, dtype=torch.float64)
    gap = int(round(1.0 / DT))
    traj = sim.integrate(x0, n_ics * gap + leads, dt=DT, spinup=1000)[:, 0]
    starts = torch.arange(n_ics) * gap
    ics = traj[starts]
    fut = torch.stack([traj[s + 1 : s + 1 + leads] for s in starts])
    return ics.float(), fut.float()


def climatology(n: int) -> torch.Tensor:
    sim = Lorenz96(40, 8.0)
    x0 = sim.random_state(1, torch.Generator().manual_seed(777), dtype=torch.float64)
    traj = sim.integrate(x0, n * 20, dt=DT, spinup=1000)[::20, 0]
    return traj.float()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    world = models.load(args.world, device="cpu")
    if args.q is not None or args.diffusion_steps is not None:
        world.configure(q=args.q, steps=args.diffusion_steps)
    true_model = physical_world("l96")
    leads = int(round(args.lead_mtu / DT))
    clim = climatology(2000)
    out: dict[str, list[dict]] = {
        k: [] for k in ("world", "true model", "persistence", "climatology")
    }
    seconds = {k: 0.0 for k in out}
    for seed in args.seeds:
        ics, fut = truths(seed, args.ics, leads)
        g = torch.Generator().manual_seed(1000 + seed)
        centre = ics + SIGMA_A * torch.randn((args.ics, 40), generator=g)  # analysis mean
        ic_ens = centre[:, None] + SIGMA_A * torch.randn((args.ics, MEMBERS, 40), generator=g)
        flat = ic_ens.reshape(-1, 40)
        t0 = time.perf_counter()
        fc = world.forecast(flat, leads, members=flat.shape[0], generator=g)
        seconds["world"] += time.perf_counter() - t0
        out["world"].append(metrics(fc.reshape(args.ics, MEMBERS, leads, 40), fut))
        t0 = time.perf_counter()
        fc = true_model.forecast(flat.double(), leads, members=flat.shape[0]).float()
        seconds["true model"] += time.perf_counter() - t0
        out["true model"].append(metrics(fc.reshape(args.ics, MEMBERS, leads, 40), fut))
        pers = ic_ens[:, :, None].expand(-1, -1, leads, -1)
        out["persistence"].append(metrics(pers, fut))
        idx = torch.randint(0, clim.shape[0], (args.ics, MEMBERS), generator=g)
        cl = clim[idx][:, :, None].expand(-1, -1, leads, -1)
        out["climatology"].append(metrics(cl, fut))
    summary = {
        name: {k: np.mean([r[k] for r in runs], 0).tolist() for k in runs[0]}
        for name, runs in out.items()
    }
    return {"per_lead": summary, "seconds": seconds, "leads": leads}


def table(res: dict, world_meta: dict) -> str:
    leads = res["leads"]
    picks = sorted({max(1, leads // 8), leads // 4, leads // 2, leads})
    lines = ["| method | " + " | ".join(f"RMSE/CRPS/SS @{k * DT:.2f}" for k in picks) + " |"]
    lines.append("|---" * (len(picks) + 1) + "|")
    for name, m in res["per_lead"].items():
        cells = [
            f"{m['rmse'][k - 1]:.3f} / {m['crps'][k - 1]:.3f} / {m['spread_skill'][k - 1]:.2f}"
            for k in picks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    w, t, p = (res["per_lead"][k] for k in ("world", "true model", "persistence"))
    one = int(round(1.0 / DT)) - 1
    beats = all(a < b for a, b in zip(w["rmse"], p["rmse"], strict=True))
    ratio = w["crps"][one] / t["crps"][one] if len(w["crps"]) > one else float("nan")
    ss = w["spread_skill"]
    lines += [
        "",
        f"- world beats persistence (RMSE) at every lead: {beats}",
        f"- world CRPS / true-model CRPS at 1 MTU: {ratio:.2f} (target <= 1.3)",
        f"- world spread/skill range over leads: [{min(ss):.2f}, {max(ss):.2f}] "
        "(target within [0.7, 1.3])",
        f"- forecast wall time (1 thread): world {res['seconds']['world']:.1f} s, "
        f"true model {res['seconds']['true model']:.1f} s",
        f"- world training: {world_meta.get('train_seconds', '?')} s CPU wall time, "
        f"{world_meta.get('global_steps', '?')} steps",
    ]
    return "\n".join(lines)


def plot_per_lead(
    lead: np.ndarray,
    series: dict[str, dict],
    path: Path,
    xlabel: str,
    styles: dict[str, dict] | None = None,
    ss_ylim: float | None = None,
    figsize: tuple[float, float] = (14, 4),
    legend_size: float | None = 8,
    dpi: int = 80,
) -> None:
    """Three panels (RMSE of the mean, fair CRPS, spread/skill with the [0.7, 1.3] target
    band) of ``series[name][metric]`` against ``lead``; ``styles[name]``: plot keywords.
    Shared by the forecast benchmarks (L96, worlds II, Kolmogorov)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=figsize)
    for name, m in series.items():
        for ax, k in zip(axes, ("rmse", "crps", "spread_skill"), strict=True):
            ax.plot(lead, m[k], label=name, **(styles or {}).get(name, {}))
    for ax, title in zip(
        axes, ("RMSE of ensemble mean", "fair CRPS", "spread / skill"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    axes[2].axhspan(0.7, 1.3, color="0.9")
    if ss_ylim is not None:
        axes[2].set_ylim(0, ss_ylim)
    axes[0].legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot(res: dict, path: Path) -> None:
    lead = np.arange(1, res["leads"] + 1) * DT
    styles = {"world": dict(ls="--", lw=2.5, zorder=3)}
    plot_per_lead(lead, res["per_lead"], path, "lead (MTU)", styles, None, (13, 3.8), None, 90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(ROOT / "models" / "checkpoints" / "l96.pt"))
    p.add_argument("--q", type=float, default=None, help="model-error level (default: ckpt's)")
    p.add_argument("--diffusion-steps", type=int, default=None)
    p.add_argument("--ics", type=int, default=32, help="initial states per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lead-mtu", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="8 ICs, 1 seed")
    p.add_argument("--tag", default="l96")
    a = p.parse_args()
    if a.quick:
        a.ics, a.seeds = 8, [0]
    res = run(a)
    meta = models.load(a.world).meta
    text = table(res, meta)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_forecast_{a.tag}{'_quick' if a.quick else ''}"
    header = (
        f"# {stem}\n\n`python experiments/bench_forecast.py {'--quick ' if a.quick else ''}"
        f"--world {Path(a.world).name}` — {len(a.seeds)} seed(s) x {a.ics} ICs x {MEMBERS} "
        f"members, sigma_a = {SIGMA_A}, q = {models.load(a.world).q if a.q is None else a.q}"
        "\n\nCells: RMSE / fair CRPS / spread-skill at the lead (MTU).\n\n"
    )
    (RESULTS / f"{stem}.md").write_text(header + text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, RESULTS / f"{stem}.png")
    print(header + text)


if __name__ == "__main__":
    main()
