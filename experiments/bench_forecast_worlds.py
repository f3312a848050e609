"""BENCHMARKS.md D on Lorenz-96 for all world kinds (World models I + II).

Same protocol and metrics as ``experiments/bench_forecast.py`` (whose helpers this
script imports): held-out L96 truths (seeds 0, 1, 2), ICs 1 MTU apart, 16-member
forecasts to 2 MTU from a calibrated analysis ensemble (sigma_a = 0.2); RMSE of the
ensemble mean, fair CRPS and spread/skill per lead, against the true model,
persistence and climatology.

Worlds: ``conditional`` (the shipped checkpoint), ``dyffusion`` (every intermediate
lead from :meth:`DYffusion.forecast_path`), ``rolling`` (the paper's rolling sampler,
:meth:`Rolling.rollout`), ``rolling-markov`` (``Rolling.forecast``: the Markov
``step`` that re-initialises the window every step, as filters use it) and
``function_space``. Checkpoints default to the shipped ``models/checkpoints/l96_<kind>.pt``
(made by the training commands in the header of each ``experiments/l96_<kind>.toml``).

Usage: ``python experiments/bench_forecast_worlds.py [--quick] [--ckpt-dir DIR]``;
``--system kolmogorov`` runs ``bench_forecast_kolmogorov.py`` (2-D Kolmogorov flow; its
options ``--seed``, ``--q KIND=V[,V..]``, ``--var-scale C[,C..]``, ``--tag`` are documented
there).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forecast import (  # noqa: E402
    DT,
    MEMBERS,
    RESULTS,
    ROOT,
    SIGMA_A,
    climatology,
    metrics,
    plot_per_lead,
    truths,
)

import models  # noqa: E402
from models.worlds.physical import physical_world  # noqa: E402

KINDS = ("conditional", "dyffusion", "rolling", "rolling-markov", "function_space")


def default_ckpt(kind: str, ckpt_dir: Path) -> Path:
    if kind == "conditional":
        return ROOT / "models" / "checkpoints" / "l96.pt"
    return ckpt_dir / f"l96_{kind.split('-')[0]}.pt"  # shipped names: models.load("l96_<kind>")


def ensemble(world, kind: str, flat: torch.Tensor, leads: int, g: torch.Generator) -> torch.Tensor:
    """``(members, leads, 40)`` forecasts at every data step (0.05 MTU)."""
    n = flat.shape[0]
    if kind == "dyffusion":
        steps = math.ceil(leads / world.horizon)
        return world.forecast_path(flat, steps, members=n, generator=g)[:, :leads]
    if kind == "rolling":
        return world.rollout(flat, leads, members=n, generator=g)
    return world.forecast(flat, leads, members=n, generator=g)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    worlds = {}
    for kind in args.kinds:
        path = default_ckpt(kind, Path(args.ckpt_dir))
        if not path.is_file():
            print(f"skip {kind}: no checkpoint {path}")
            continue
        worlds[kind] = models.load(path, device="cpu")
    true_model = physical_world("l96")
    leads = int(round(args.lead_mtu / DT))
    clim = climatology(2000)
    names = [*worlds, "true model", "persistence", "climatology"]
    out: dict[str, list[dict]] = {k: [] for k in names}
    seconds = {k: 0.0 for k in names}
    for seed in args.seeds:
        ics, fut = truths(seed, args.ics, leads)
        g = torch.Generator().manual_seed(1000 + seed)
        centre = ics + SIGMA_A * torch.randn((args.ics, 40), generator=g)
        ic_ens = centre[:, None] + SIGMA_A * torch.randn((args.ics, MEMBERS, 40), generator=g)
        flat = ic_ens.reshape(-1, 40)
        for kind, world in worlds.items():
            gk = torch.Generator().manual_seed(2000 + seed)
            t0 = time.perf_counter()
            fc = ensemble(world, kind, flat, leads, gk)
            seconds[kind] += time.perf_counter() - t0
            out[kind].append(metrics(fc.reshape(args.ics, MEMBERS, leads, 40), fut))
        t0 = time.perf_counter()
        fc = true_model.forecast(flat.double(), leads, members=flat.shape[0]).float()
        seconds["true model"] += time.perf_counter() - t0
        out["true model"].append(metrics(fc.reshape(args.ics, MEMBERS, leads, 40), fut))
        pers = ic_ens[:, :, None].expand(-1, -1, leads, -1)
        out["persistence"].append(metrics(pers, fut))
        idx = torch.randint(0, clim.shape[0], (args.ics, MEMBERS), generator=g)
        out["climatology"].append(metrics(clim[idx][:, :, None].expand(-1, -1, leads, -1), fut))
    summary = {
        name: {k: np.mean([r[k] for r in runs], 0).tolist() for k in runs[0]}
        for name, runs in out.items()
    }
    meta = {
        k: {m: w.meta.get(m) for m in ("global_steps", "train_seconds")} for k, w in worlds.items()
    }
    return {"per_lead": summary, "seconds": seconds, "leads": leads, "train": meta}


def table(res: dict) -> str:
    leads = res["leads"]
    picks = sorted({max(1, leads // 8), leads // 4, leads // 2, leads})
    head = " | ".join(f"RMSE/CRPS/SS @{k * DT:.2f}" for k in picks)
    lines = [f"| method | {head} | forecast s |", "|---" * (len(picks) + 2) + "|"]
    for name, m in res["per_lead"].items():
        cells = [
            f"{m['rmse'][k - 1]:.3f} / {m['crps'][k - 1]:.3f} / {m['spread_skill'][k - 1]:.2f}"
            for k in picks
        ]
        sec = res["seconds"].get(name, 0.0)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sec:.1f} |")
    p, t = res["per_lead"]["persistence"], res["per_lead"]["true model"]
    one = min(int(round(1.0 / DT)), leads) - 1
    lines += [
        "",
        "| world | beats persistence (RMSE, all leads) | CRPS/true-model CRPS @1 MTU "
        "| spread/skill range | optimiser steps / wall s of the last (resumed) training run |",
        "|---|---|---|---|---|",
    ]
    for name, tr in res["train"].items():
        w = res["per_lead"][name]
        beats = all(a < b for a, b in zip(w["rmse"], p["rmse"], strict=True))
        ratio = w["crps"][one] / t["crps"][one]
        ss = w["spread_skill"]
        lines.append(
            f"| {name} | {beats} | {ratio:.2f} | [{min(ss):.2f}, {max(ss):.2f}] "
            f"| {tr['global_steps']} / {tr['train_seconds']} |"
        )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    lead = np.arange(1, res["leads"] + 1) * DT
    plot_per_lead(lead, res["per_lead"], path, "lead (MTU)", ss_ylim=3)


def main() -> None:
    if "--system" in sys.argv and "kolmogorov" in sys.argv:
        from bench_forecast_kolmogorov import main as kolmogorov_main

        return kolmogorov_main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default="l96", choices=["l96", "kolmogorov"])

    p.add_argument("--ckpt-dir", default=str(ROOT / "models" / "checkpoints"))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--ics", type=int, default=8, help="initial states per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lead-mtu", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="4 ICs, 1 seed")
    a = p.parse_args()
    if a.quick:
        a.ics, a.seeds = 4, [0]
    res = run(a)
    text = table(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_forecast_worlds_l96{'_quick' if a.quick else ''}"
    header = (
        f"# {stem}\n\n`python experiments/bench_forecast_worlds.py{' --quick' if a.quick else ''}`"
        f" — {len(a.seeds)} seed(s) x {a.ics} ICs x {MEMBERS} members, sigma_a = {SIGMA_A}; "
        "torch threads 1.\n\nCells: RMSE / fair CRPS / spread-skill at the lead (MTU).\n\n"
    )
    (RESULTS / f"{stem}.md").write_text(header + text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, RESULTS / f"{stem}.png")
    print(header + text)


if __name__ == "__main__":
    main()
