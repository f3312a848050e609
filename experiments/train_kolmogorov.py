"""Train a Kolmogorov-flow world (32² by default): the shipped conditional one, or with
``--config experiments/kolmogorov_{dyffusion,rolling,function_space}.toml`` the issue-#8
kinds (results to ``experiments/results/train_kolmogorov_<kind>.json``).

Data: the pseudo-spectral simulator of :mod:`models.physics.kolmogorov` run directly at
the target resolution (``--n``, default 32²; Re 1000, k_f 4, drag 0.1), ``--traj``
trajectories from ``random_state`` (seed ``--seed``), a spin-up of 20 time units, then
``--snaps`` snapshots every world step ``dt = 0.2`` (20 RK4 sub-steps of 0.01, as
``physical_world("kolmogorov")``). Evaluation uses another seed (see
``bench_dpf_kolmogorov.py``).

Model: :class:`~models.worlds.conditional.Conditional` with the increment target, a
circular UNet2d and the EDM schedule (``experiments/kolmogorov_conditional.toml``),
trained with Lightning by :func:`models.train.train_world` under a wall-clock cap.

After training, the one-step error is measured on held-out trajectories (seed
``--seed + 1``): RMSE of a single world sample and of an 8-member mean against the
simulator, next to the increment std (= persistence RMSE). Results go to
``experiments/results/bench_dpf_kolmogorov_train.json``.

Usage: ``python experiments/train_kolmogorov.py [--minutes 18] [--n 32] [--traj 32]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.physics import Kolmogorov  # noqa: E402
from models.train import TrainConfig, export_lightning, train_world  # noqa: E402

DT, SUB, SPINUP = 0.2, 20, 100  # world step, RK4 sub-steps per step, spin-up steps (20 tu)
RESULTS = ROOT / "experiments" / "results"


def simulate(n: int, seed: int, n_traj: int, n_snap: int, device: str = "cpu") -> torch.Tensor:
    """``(n_traj, n_snap, n, n)`` float32 vorticity (on CPU), one snapshot per world step
    after spin-up; the simulation itself runs on ``device`` (float64)."""
    sim = Kolmogorov(n)
    w = sim.random_state(
        n_traj, torch.Generator().manual_seed(seed), dtype=torch.float64, device=device
    )
    for _ in range(SPINUP * SUB):
        w = sim.step(w, DT / SUB)
    out = []
    for _ in range(n_snap):
        for _ in range(SUB):
            w = sim.step(w, DT / SUB)
        out.append(w)
    x = torch.stack(out, 1).float().cpu()
    if not torch.isfinite(x).all():
        raise RuntimeError("Kolmogorov simulation blew up")
    return x


def to_dataarray(x: torch.Tensor) -> xr.DataArray:
    """``(member, time, y, x)`` DataArray named ``vorticity`` with a numeric time in units of t."""
    n = x.shape[-1]
    c = 2 * np.pi * np.arange(n) / n
    return xr.DataArray(
        x.numpy(),
        dims=("member", "time", "y", "x"),
        coords={"time": DT * np.arange(x.shape[1]), "y": c, "x": c},
        name="vorticity",
    )


@torch.no_grad()
def one_step_error(world: torch.nn.Module, x: torch.Tensor, members: int = 8) -> dict[str, float]:
    """One-step errors on held-out pairs ``x`` ``(B, T, n, n)`` (simulator truth); one world
    step is ``world.horizon`` data steps for DYffusion, one data step otherwise."""
    lead = int(getattr(world, "horizon", 1))
    dev = next(world.parameters()).device
    x0 = x[:, :-lead].reshape(-1, *x.shape[2:]).to(dev)
    x1 = x[:, lead:].reshape(-1, *x.shape[2:]).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    one = world.step(x0, g)
    ens = torch.stack([world.step(x0, g) for _ in range(members)])
    rmse = lambda a: float(((a - x1) ** 2).mean().sqrt())  # noqa: E731
    return {
        "rmse_one_sample": rmse(one),
        "rmse_ens_mean": rmse(ens.mean(0)),
        "ens_spread": float(ens.var(0, unbiased=True).mean().sqrt()),
        "increment_std": rmse(x0),  # persistence RMSE
        "state_std": float(x1.std()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--traj", type=int, default=32)
    p.add_argument("--snaps", type=int, default=200)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--minutes", type=float, default=18.0)
    p.add_argument("--config", default=str(ROOT / "experiments" / "kolmogorov_conditional.toml"))
    p.add_argument("--out", default=None)
    p.add_argument(
        "--device",
        default="cpu",
        help="where the training data are simulated and the world evaluated (cpu, cuda, "
        "auto); training itself uses the config's accelerator (auto: a GPU when present)",
    )
    p.add_argument(
        "--from-lightning",
        default=None,
        metavar="CKPT",
        help="no training: export the world of this Lightning checkpoint (last.ckpt of a run "
        "stopped before its export), calibrated on freshly simulated data (--traj of them)",
    )
    a = p.parse_args(argv)
    from models.device import resolve_device

    dev = str(resolve_device(a.device))
    torch.set_num_threads(1)
    out = Path(a.out or ROOT / "models" / "checkpoints" / f"kolmogorov{a.n}.pt")
    t0 = time.perf_counter()
    x = simulate(a.n, a.seed, a.traj, a.snaps, dev)
    t_sim = time.perf_counter() - t0
    print(f"simulated {tuple(x.shape)} in {t_sim:.1f}s", flush=True)
    log_dir = tempfile.mkdtemp(prefix="kolmogorov_train_")
    cfg = TrainConfig.from_toml(
        a.config, out=str(out), dt=DT, sample_dim="member", max_minutes=a.minutes, log_dir=log_dir
    )
    meta = {
        "data": f"Kolmogorov({a.n}) Re 1000 k_f 4 drag 0.1; seed {a.seed}; {a.traj} traj x "
        f"{a.snaps} snapshots, dt {DT}, spin-up {SPINUP * DT} tu",
    }
    t1 = time.perf_counter()
    if a.from_lightning:
        meta["exported_from"] = Path(a.from_lightning).name
        export_lightning(cfg, a.from_lightning, to_dataarray(x), meta=meta)
    else:
        train_world(cfg, to_dataarray(x), meta=meta)
    t_train = time.perf_counter() - t1
    world = models.load(out, device=dev).eval()
    held = simulate(a.n, a.seed + 1, 4, 17, dev)
    err = one_step_error(world, held)
    kind = world.kind
    payload = models.checkpoint.read(out) if hasattr(models, "checkpoint") else {}
    info = {
        "grid": a.n,
        "kind": kind,
        "config": Path(a.config).name,
        "train_seconds": round(t_train, 1),
        "simulate_seconds": round(t_sim, 1),
        "global_steps": payload.get("meta", {}).get("global_steps"),
        "checkpoint_bytes": os.path.getsize(out),
        "n_params": sum(p.numel() for p in world.parameters()),
        **{k: round(v, 4) for k, v in err.items()},
    }
    print(json.dumps(info, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_dpf_kolmogorov_train" if kind == "conditional" else f"train_kolmogorov_{kind}"
    if a.n != 32:
        name = f"train_kolmogorov{a.n}_{kind}"
    dst = RESULTS / f"{name}.json"
    tmp = dst.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, dst)
    assert math.isfinite(err["rmse_one_sample"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
