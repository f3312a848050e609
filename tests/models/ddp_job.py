"""Helper of ``test_train.py``: 4 DDP steps on 2 CPU processes (gloo); every rank saves
its initial and final denoiser weights to ``OUT/init<rank>.pt`` and ``OUT/rank<rank>.pt``.

Run as a script (Lightning's DDP launcher re-executes it for rank 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import xarray as xr

from models.physics import Lorenz96
from models.train import TrainConfig, fit


class DumpWeights(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def _dump(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.world.state_dict().items()}
        torch.save(state, self.out / f"{name}{trainer.global_rank}.pt")

    def on_train_start(self, trainer, module):
        self._dump(trainer, module, "init")

    def on_train_end(self, trainer, module):
        self._dump(trainer, module, "rank")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    sim = Lorenz96(8)
    x0 = sim.random_state(1, torch.Generator().manual_seed(0))
    traj = sim.integrate(x0, 300, spinup=100)[:, 0].numpy()
    da = xr.DataArray(traj, dims=("time", "x"), coords={"time": np.arange(300) * 0.05}, name="u")
    cfg = TrainConfig(
        out=str(out / "ddp.pt"),
        backbone="resnet1d",
        backbone_kwargs=dict(width=8, depth=1),
        steps=4,
        batch_size=16,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        progress=False,
        log_dir=str(out / "logs"),
    )
    fit(cfg, da, callbacks=[DumpWeights(out)])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
