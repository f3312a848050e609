"""Train the shipped world-model checkpoints ``models/checkpoints/{l96,l63}.pt`` on CPU.

How they are made (all recorded in each checkpoint's ``meta``):

* **Data**: simulated with the package's own simulators (``models.physics``) from
  the *training* seeds below, which no evaluation uses (benchmarks draw their
  truths from seeds 0-99): 8 independent trajectories, each spun up for 500
  steps on the attractor, then ``STEPS`` steps kept.
  - ``l96``: Lorenz-96, 40 variables, F = 8, RK4 dt = 0.05 (8 x 3000 steps).
  - ``l63``: Lorenz-63, standard parameters, RK4 dt = 0.01 (8 x 5000 steps).
* **Model** (``experiments/{l96,l63}_conditional.toml``):
  :class:`~models.worlds.conditional.Conditional` predicting the
  normalised increment ``(x_{k+1} - x_k - m) / s`` from the normalised ``x_k``
  (history 1), EDM schedule, ``x0``-prediction with EDM preconditioning.
  ``l96``: periodic ResNet1d (global normalisation keeps it shift-equivariant);
  ``l63``: MLP (pointwise normalisation: the three variables differ).
* **Training**: AdamW, EMA of the weights, a wall-clock cap (``--minutes``),
  torch threads = ``--threads`` (2 by default), seed 0; the last 5 % of each
  trajectory validates and calibrates the twist variance.

The shipped files were made with ``--which l96 --minutes 6.5 --threads 8`` on a 16-core
CPU (8549 steps) and ``--which l63 --minutes 20 --threads 1`` on the 2-core box with
``experiments/l63_conditional.toml`` as of stop 13 (27887 steps); see
``models/checkpoints/README.md``.

Usage: ``python experiments/train_checkpoints.py [--which l96 l63] [--minutes 10]``
(``--quick``: a 1-minute smoke run into the git-ignored ``experiments/results/lightning_logs``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from models.physics import Lorenz63, Lorenz96
from models.train import TrainConfig, train_world

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEEDS = {"l96": 9601, "l63": 6301}  # evaluation uses seeds 0-99, never these
N_TRAJ, SPINUP = 8, 500

SYSTEMS = {
    "l96": dict(sim=lambda: Lorenz96(40, 8.0), dt=0.05, steps=3000, dims=("x",)),
    "l63": dict(sim=lambda: Lorenz63(), dt=0.01, steps=5000, dims=("component",)),
}


def simulate(name: str) -> xr.DataArray:
    """``(trajectory, time, *S)`` training data of ``name`` from its training seed."""
    system = SYSTEMS[name]
    sim = system["sim"]()
    g = torch.Generator().manual_seed(TRAIN_SEEDS[name])
    x0 = sim.random_state(N_TRAJ, g, dtype=torch.float64)
    traj = sim.integrate(x0, system["steps"], dt=system["dt"], spinup=SPINUP)
    arr = traj.float().transpose(0, 1).numpy()  # (trajectory, time, *S)
    t = np.arange(system["steps"]) * system["dt"]
    return xr.DataArray(
        arr,
        dims=("trajectory", "time", *system["dims"]),
        coords={"time": t},
        name="state",
        attrs={"long_name": f"{name} state", "units": "1"},
    )


def train(name: str, minutes: float, threads: int, out: Path) -> Path:
    torch.set_num_threads(threads)
    data = simulate(name)
    cfg = TrainConfig.from_toml(
        ROOT / "experiments" / f"{name}_conditional.toml",
        out=str(out),
        sample_dim="trajectory",
        max_minutes=minutes,
        progress=False,
        log_every=200,
        log_dir=str(ROOT / "experiments" / "results" / "lightning_logs"),
        accelerator="cpu",
    )
    t0 = time.perf_counter()
    meta = dict(
        recipe=f"experiments/train_checkpoints.py ({name})",
        data_seed=TRAIN_SEEDS[name],
        n_trajectories=N_TRAJ,
        steps_per_trajectory=SYSTEMS[name]["steps"],
        spinup=SPINUP,
        torch_threads=threads,
    )
    path = train_world(cfg, data, meta=meta)
    print(
        f"{name}: wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--which", nargs="+", default=["l96", "l63"], choices=sorted(SYSTEMS))
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1-minute run into experiments/results")
    p.add_argument("--out-dir", default=str(ROOT / "models" / "checkpoints"))
    a = p.parse_args()
    for name in a.which:
        if a.quick:
            out = ROOT / "experiments" / "results" / "lightning_logs" / f"{name}_quick.pt"
            train(name, 1.0, a.threads, out)
        else:
            train(name, a.minutes, a.threads, Path(a.out_dir) / f"{name}.pt")


if __name__ == "__main__":
    main()
