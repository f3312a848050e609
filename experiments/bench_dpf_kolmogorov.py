"""Fluid case of the diffusion-particle-filter benchmark (issue 7): Kolmogorov flow.

Grid: 32² (the shipped learned world ``models/checkpoints/kolmogorov32.pt``, trained on
CPU by ``experiments/train_kolmogorov.py``; 64² did not fit the CPU training budget).
Truth: the simulator at the same resolution (Re 1000, k_f 4, drag 0.1, world step
``dt = 0.2``), evaluation seed ``10_000 + seed`` (training used 100/101), spun up 20
time units. Observation settings (BENCHMARKS.md B/D), noise sigma 0.1:

* ``a``: block means every 4th world step. The issue's "coarsened ×8" refers to the 64²
  grid (8×8 = 64 block means of side 2π/8); on 32² the same blocks are ``coarsen:4``,
  the default (``--op-a coarsen:8`` gives the literal 4×4 = 16 block means, which leave
  every filter at climatological error);
* ``b``: ``every:4`` (every 4th grid point on each axis: 64 numbers) every world step.

Initial ensemble: ``truth_0 + e_0 + e_n`` with ``e_0, e_n`` smooth random fields
(``Kolmogorov.random_state``, rms ``--sigma0``; the climatological std is ~5), so the
initial mean is off by ``e_0``.

Methods: ``ldpf`` (local diffusion particle filter, :func:`assim.filters.dpf.make_dpf`
with ``--dpf-radius``; learned world with ``--steps`` diffusion steps and model-error ``--q``),
``letkf`` (learned world, same ``steps``/``q``), ``letkf-true`` (the simulator,
``Physical``; reference). Metrics per cycle: spatial RMSE of the analysis mean and
spread (``sqrt`` of the spatially averaged ensemble variance) from :func:`assim.run`;
summary over the second half of the cycles: ``rmse.a``, spread, spread/skill, and
cycles/s (one torch thread).

Usage: ``python experiments/bench_dpf_kolmogorov.py --quick`` (< 60 s);
``python experiments/bench_dpf_kolmogorov.py --settings a --cycles-a 12`` (one setting per
process; the report — ``experiments/results/bench_dpf_kolmogorov{tag}.{md,json,png}``
and ``..._panel.png`` — is rebuilt from all settings' JSON files present).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from assim.filters.base import Ensemble  # noqa: E402
from assim.filters.dpf import make_dpf  # noqa: E402
from assim.filters.enkf import make_filter  # noqa: E402
from assim.obs import make_observation  # noqa: E402
from assim.runner import run  # noqa: E402
from experiments.atomic import write_atomic  # noqa: E402
from models.worlds.physical import physical_world  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
SPINUP = 100  # world steps (20 time units)
SETTINGS = {
    "a": {"op": "coarsen:8", "sigma": 0.1, "spc": 4, "label": "coarsen x8, every 4th step"},
    "b": {"op": "every:4", "sigma": 0.1, "spc": 1, "label": "every 4th point, every step"},
}
METHODS = ("ldpf", "letkf", "letkf-true")


def make_truth(n: int, seed: int, cycles: int, spc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial truth ``(n, n)`` and truth at each cycle ``(cycles, n, n)`` (float32)."""
    world = physical_world("kolmogorov", n=n)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = world.simulator.random_state(1, g, dtype=torch.float64)
    for _ in range(SPINUP):
        x = world.step(x)
    x0, out = x[0].clone(), []
    for _ in range(cycles):
        for _ in range(spc):
            x = world.step(x)
        out.append(x[0])
    return x0.float(), torch.stack(out).float()


def initial_ensemble(x0: torch.Tensor, members: int, sigma0: float, seed: int) -> torch.Tensor:
    """``(members, n, n)``: ``x0 + e_0 + e_n`` with smooth random ``e`` of rms ``sigma0``."""
    sim = physical_world("kolmogorov", n=x0.shape[-1]).simulator
    g = torch.Generator().manual_seed(20_000 + seed)
    e0 = sim.random_state(1, g, rms=sigma0)
    e = sim.random_state(members, g, rms=sigma0)
    return x0 + e0 + e


def build(method: str, args: argparse.Namespace, setting: str, learned: torch.nn.Module):
    """``(world, filter, members)`` for one method."""
    radius = args.radius_a if setting == "a" else args.radius_b
    if method == "ldpf":
        filt = make_dpf(learned, radius=args.dpf_radius, steps=args.steps, q=args.q)
        return learned, filt, args.n_dpf
    if method == "letkf":
        learned.configure(steps=args.steps, q=args.q)
        filt = make_filter("letkf", radius=radius, inflation=args.inflation, rtps=args.rtps)
        return learned, filt, args.n_letkf
    if method == "letkf-true":
        world = physical_world("kolmogorov", n=args.n)
        filt = make_filter("letkf", radius=radius, inflation=args.inflation, rtps=args.rtps)
        return world, filt, args.n_letkf
    raise ValueError(f"unknown method {method!r}; known {METHODS}")


def run_setting(args: argparse.Namespace, setting: str, learned: torch.nn.Module) -> dict:
    """All methods and seeds of one observation setting; returns the JSON record."""
    s = dict(SETTINGS[setting])
    if setting == "a":
        s["op"] = args.op_a
        s["label"] = f"{args.op_a.replace(':', ' x')}, every 4th step"
    cycles = args.cycles_a if setting == "a" else args.cycles_b
    obs = make_observation(s["op"], s["sigma"])
    rec: dict = {"setting": setting, **s, "cycles": cycles, "runs": [], "panel": {}}
    dev = torch.device(args.device)
    for seed in args.seeds:
        x0, truth = make_truth(args.n, seed, cycles, s["spc"])
        ys = obs.sample(truth, torch.Generator().manual_seed(30_000 + seed))
        x0, truth, ys = x0.to(dev), truth.to(dev), ys.to(dev)
        for method in args.methods:
            world, filt, members = build(method, args, setting, learned)
            ens0 = Ensemble(initial_ensemble(x0.cpu(), members, args.sigma0, seed).to(dev))
            g = torch.Generator(dev).manual_seed(40_000 + seed)
            ds = run(
                world,
                filt,
                ys,
                obs,
                ens0,
                truth=truth,
                generator=g,
                steps_per_cycle=s["spc"],
                progress=False,
            )
            rmse, spread = ds["rmse"].values, ds["spread"].values
            h = cycles // 2
            r = {
                "method": method,
                "seed": seed,
                "members": members,
                "rmse": rmse.round(4).tolist(),
                "spread": spread.round(4).tolist(),
                "rmse_a": float(rmse[h:].mean()),
                "spread_a": float(spread[h:].mean()),
                "cycles_per_s": float(ds.attrs["cycles_per_second"]),
                "finite": bool(np.isfinite(rmse).all()),
            }
            rec["runs"].append(r)
            print(
                f"[{setting}] seed {seed} {method:10s} N={members} rmse.a {r['rmse_a']:.3f} "
                f"spread {r['spread_a']:.3f} {r['cycles_per_s']:.3f} cyc/s",
                flush=True,
            )
            if seed == args.seeds[0]:
                rec["panel"][method] = {
                    "mean": ds["mean"].values[-1].astype(np.float32).tolist(),
                    "std": ds["std"].values[-1].astype(np.float32).tolist(),
                }
        if seed == args.seeds[0]:
            rec["panel"]["truth"] = truth[-1].cpu().tolist()
            rec["panel"]["y"] = ys[-1].cpu().tolist()
    return rec


def _obs_field(op: str, y: np.ndarray, n: int) -> np.ndarray:
    """Observations drawn on the grid: block means repeated (coarsen), points (every)."""
    kind, k = op.split(":")
    k = int(k)
    if kind == "coarsen":
        return np.kron(y.reshape(n // k, n // k), np.ones((k, k)))
    f = np.full((n, n), np.nan)
    f[::k, ::k] = y.reshape(len(range(0, n, k)), -1)
    return f


def report(tag: str, args: argparse.Namespace) -> None:
    """Merge the per-setting JSON files into the md table, curves and the field panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = []
    for s in SETTINGS:
        p = RESULTS / f"bench_dpf_kolmogorov{tag}_{s}.json"
        if p.is_file():
            recs.append(json.loads(p.read_text()))
    if not recs:
        return
    lines = [
        f"# bench_dpf_kolmogorov{tag}",
        "",
        f"Kolmogorov flow {args.n}² (Re 1000), learned world `kolmogorov{args.n}.pt` "
        f"(diffusion steps {args.steps}, q {args.q}), sigma0 {args.sigma0}; LETKF inflation "
        f"{args.inflation}, rtps {args.rtps}, radius a {args.radius_a}, b {args.radius_b}; "
        f"local dpf radius {args.dpf_radius} (grid units). Scores: mean over seeds of the "
        "time mean over the second half of the cycles; spread/skill = spread / rmse.a; "
        f"cycles/s on {args.device} (1 torch thread; the CPU box is a shared 2-core one).",
        "",
        "| setting | method | N | cycles | seeds | rmse.a (per seed) | spread | spread/skill "
        "| cycles/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, len(recs), figsize=(6 * len(recs), 4), squeeze=False)
    colours = {"ldpf": "C0", "letkf": "C1", "letkf-true": "C2"}
    for ax, rec in zip(axes[0], recs, strict=True):
        for method in METHODS:
            runs = [r for r in rec["runs"] if r["method"] == method]
            if not runs:
                continue
            ra = np.array([r["rmse_a"] for r in runs])
            sa = np.array([r["spread_a"] for r in runs])
            cps = np.mean([r["cycles_per_s"] for r in runs])
            per = ", ".join(f"{v:.2f}" for v in ra)
            lines.append(
                f"| {rec['setting']}: {rec['label']} | {method} | {runs[0]['members']} | "
                f"{rec['cycles']} | {len(runs)} | **{ra.mean():.3f}** ({per}) | {sa.mean():.3f} "
                f"| {sa.mean() / ra.mean():.2f} | {cps:.3f} |"
            )
            t = np.arange(1, rec["cycles"] + 1) * rec["spc"] * 0.2
            for i, r in enumerate(runs):
                lab = method if i == 0 else None
                ax.plot(t, r["rmse"], "-", color=colours[method], lw=1, label=lab)
                ax.plot(t, r["spread"], ":", color=colours[method], lw=1)
        ax.set_title(f"{rec['setting']}: {rec['label']} (solid rmse, dotted spread)")
        ax.set_xlabel("time")
        ax.set_ylabel("vorticity")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"bench_dpf_kolmogorov{tag}.png", dpi=100)
    plt.close(fig)
    write_atomic(RESULTS / f"bench_dpf_kolmogorov{tag}.md", "\n".join(lines) + "\n")
    write_atomic(
        RESULTS / f"bench_dpf_kolmogorov{tag}.json",
        json.dumps([{k: v for k, v in r.items() if k != "panel"} for r in recs]),
    )
    # panel: truth, observations, analysis mean and spread per method, last cycle, seed 0
    cols = ["truth", "observations"] + [
        f"{m} {q}" for m in METHODS if m in recs[0]["panel"] for q in ("mean", "spread")
    ]
    fig, axes = plt.subplots(
        len(recs), len(cols), figsize=(2.6 * len(cols), 2.6 * len(recs)), squeeze=False
    )
    for row, rec in zip(axes, recs, strict=True):
        pan = rec["panel"]
        truth = np.array(pan["truth"])
        vmax = float(np.abs(truth).max())
        fields = [truth, _obs_field(rec["op"], np.array(pan["y"]), truth.shape[0])]
        for m in METHODS:
            if m in pan:
                fields += [np.array(pan[m]["mean"]), np.array(pan[m]["std"])]
        smax = max(float(np.max(f)) for f, c in zip(fields, cols, strict=False) if "spread" in c)
        for ax, f, c in zip(row, fields, cols, strict=False):
            sp = "spread" in c
            im = ax.imshow(
                f,
                origin="lower",
                cmap="viridis" if sp else "RdBu_r",
                vmin=0 if sp else -vmax,
                vmax=smax if sp else vmax,
            )
            ax.set_title(f"{rec['setting']}: {c}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(RESULTS / f"bench_dpf_kolmogorov{tag}_panel.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cycles-a", type=int, default=12)
    p.add_argument("--cycles-b", type=int, default=30)
    p.add_argument("--n-dpf", type=int, default=32)
    p.add_argument("--n-letkf", type=int, default=24)
    p.add_argument("--steps", type=int, default=3, help="diffusion steps per world step")
    p.add_argument("--q", type=float, default=0.75, help="model-error level of the learned world")
    p.add_argument("--op-a", default="coarsen:4", help="operator of setting a (module doc)")
    p.add_argument("--radius-a", type=float, default=6.0, help="LETKF radius, setting a")
    p.add_argument("--radius-b", type=float, default=6.0, help="LETKF radius, setting b")
    p.add_argument("--dpf-radius", type=float, default=4.0, help="local dpf radius")
    p.add_argument("--inflation", type=float, default=1.2)
    p.add_argument("--rtps", type=float, default=0.0)
    p.add_argument("--sigma0", type=float, default=1.0)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the whole run)")
    p.add_argument("--tag", default="")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.quick:
        a.seeds, a.cycles_a, a.cycles_b, a.n_dpf, a.n_letkf, a.steps = [0], 2, 3, 8, 8, 2
        a.tag = a.tag or "_quick"
    if a.report_only:
        report(a.tag, a)
        return 0
    ckpt = Path(a.ckpt or ROOT / "models" / "checkpoints" / f"kolmogorov{a.n}.pt")
    learned = models.load(ckpt, device=a.device).eval()
    if tuple(learned.state_shape) != (a.n, a.n):
        raise SystemExit(f"{ckpt}: world state shape {learned.state_shape} != ({a.n}, {a.n})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for setting in a.settings:
        rec = run_setting(a, setting, learned)
        rec["args"] = {k: v for k, v in vars(a).items() if k not in ("report_only",)}
        write_atomic(RESULTS / f"bench_dpf_kolmogorov{a.tag}_{setting}.json", json.dumps(rec))
    report(a.tag, a)
    print(f"done in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
