"""Calibrate the twist variances of a trained Rolling world (``Rolling.calibrate``) and
rewrite its checkpoint, for worlds trained before ``train_world`` calibrated them.

The held-out pairs are simulated with the true model from a seed that no benchmark uses
(calibration is part of training: the filters never see the equations):

    python experiments/calibrate_rolling.py --ckpt models/checkpoints/l96_rolling.pt

Lorenz-96 only (the shipped Rolling world); pairs ``(x_k, x_{k+1})`` every 4th step of 8
trajectories after 100 spin-up steps, 512 in all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.checkpoint import save  # noqa: E402
from models.worlds.physical import physical_world  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Rolling checkpoint (rewritten in place)")
    p.add_argument("--seed", type=int, default=12345, help="trajectory seed (not 0-2, 7-11)")
    p.add_argument("--pairs", type=int, default=512)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    world = models.load(a.ckpt)
    if world.kind != "rolling" or tuple(world.state_shape) != (40,):
        raise SystemExit(f"{a.ckpt}: expected a Lorenz-96 Rolling world, got {world.kind}")
    g = torch.Generator().manual_seed(a.seed)
    x0 = 3 * torch.randn(8, 40, generator=g, dtype=torch.float64)
    traj = physical_world("l96").forecast(x0, 400, members=8)[:, 100:].float()
    hist = traj[:, :-1:4].reshape(-1, 1, 40)[: a.pairs]
    nxt = traj[:, 1::4].reshape(-1, 40)[: a.pairs]
    mse = world.calibrate(hist, nxt, seed=a.seed)
    meta = {
        **world.meta,
        "calibration": f"Rolling.calibrate, {len(nxt)} simulated pairs, seed {a.seed}",
    }
    save(world, a.ckpt, meta)
    print(f"{a.ckpt}: cal_mse per chain index {[round(float(v), 5) for v in mse]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
