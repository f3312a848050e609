"""Training of world models with Lightning over windows cut from an xarray dataset.

``train_world(config) -> path`` fits a :class:`~models.worlds.conditional.Conditional`
world on ``(x_{k-h+1..k}, x_{k+1})`` windows of one variable of a netCDF file or an
in-memory xarray object, and writes a checkpoint that :func:`models.load` turns
back into a ready world (see :mod:`models.checkpoint`; no Lightning needed to load).

* Data (:mod:`models.windows`) stay lazy (``xarray.open_dataset(..., chunks={})``, dask-backed):
  normalisation statistics are xarray reductions over the training split, and
  windows are read one at a time unless the variable is small enough to load
  (``max_in_memory_mb``).
* The split is in time: the first ``1 - val_fraction`` of every trajectory trains,
  the rest validates; statistics use the training part only.
* Seeds: :func:`lightning.seed_everything` (weights, noise draws, shuffling).
* Multi-device: any Lightning strategy (``strategy="ddp"``, ``devices=2``); the
  distributed sampler is inserted by Lightning and only rank 0 writes the file.
* Resume: ``ckpt_path`` (a Lightning ``.ckpt`` from ``<log_dir>/checkpoints``); a run that
  stopped before writing its world: :func:`export_lightning`.

Run as ``python -m models.train CONFIG.toml`` (the ``assim train`` command wraps it).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import xarray as xr
from torch import Tensor

from models.checkpoint import save as save_checkpoint
from models.windows import WindowDataModule, validation_pairs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train_world`` needs; load from TOML with :meth:`from_toml`.

    Model fields mirror :class:`~models.worlds.conditional.ConditionalSpec`.
    ``steps`` caps optimiser steps (``-1``: run ``epochs`` epochs).
    """

    out: str = "world.pt"
    data: str = ""  # netCDF path (the CLI resolves catalogue names to paths)
    variable: str | None = None  # None: the only data variable
    time_dim: str = "time"
    sample_dim: str | None = None  # independent trajectories (e.g. "member"), if any
    dt: float | None = None  # None: from the time coordinate
    world: str = "conditional"
    target: str = "increment"
    history: int = 1
    normalise: str = "global"  # "global" (one mean/std) or "pointwise"
    backbone: str = "auto"  # resnet1d (1-D ring), unet2d (2-D grid), fno, mlp
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    world_kwargs: dict[str, Any] = field(default_factory=dict)  # kind-specific spec fields
    schedule: str = "edm"
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    sigma_data: float = 1.0
    sampler: str = "ddpm"
    diffusion_steps: int = 5
    eta: float = 1.0
    q: float = 0.0
    epochs: int = 10
    steps: int = -1
    max_minutes: float | None = None  # wall-clock cap on training (Lightning max_time)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.0  # 0: no EMA; e.g. 0.999 keeps an EMA of the weights and saves it
    val_fraction: float = 0.1
    max_in_memory_mb: float = 512.0
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_workers: int = 0
    log_dir: str | None = None  # None: next to ``out``
    log_every: int = 50
    progress: bool = True
    ckpt_path: str | None = None  # resume from this Lightning checkpoint
    calibrate: bool = True  # measure the denoising error per noise level for the twists

    def __post_init__(self) -> None:
        if self.target not in ("increment", "state"):
            raise ValueError(f"target must be 'increment' or 'state', got {self.target!r}")
        if self.normalise not in ("global", "pointwise"):
            raise ValueError(f"normalise must be 'global' or 'pointwise', got {self.normalise!r}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Read a TOML file (top-level keys = fields) and apply ``overrides`` (None skipped)."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read training config {str(path)!r}: {exc}") from exc
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)


class WorldModule(L.LightningModule):
    """Denoising score matching of a world's one-step diffusion model (AdamW, optional EMA).

    The loss is ``world.denoiser.loss(z0, cond)`` on normalised pairs from
    ``world.encode_pair(history, next)``; ``ema_decay > 0`` keeps an exponential
    moving average of the denoiser weights that :meth:`export_world` copies into
    the saved world.
    """

    def __init__(self, world: torch.nn.Module, lr: float, weight_decay: float, ema_decay: float):
        super().__init__()
        self.world = world
        self.lr, self.weight_decay = lr, weight_decay
        self.ema = None
        if ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                world.denoiser, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
            )

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        hist, nxt = batch
        if hasattr(self.world, "training_loss"):  # worlds with their own objective
            return self.world.training_loss(hist, nxt)
        z0, cond = self.world.encode_pair(hist, nxt)
        return self.world.denoiser.loss(z0, cond)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, on_epoch=True, sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.world.denoiser)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.world.denoiser.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )

    def export_world(self) -> torch.nn.Module:
        """The world with EMA weights (if any) copied in."""
        if self.ema is not None:
            self.world.denoiser.load_state_dict(self.ema.module.state_dict())
        return self.world


def build_world(config: TrainConfig, dm: WindowDataModule) -> torch.nn.Module:
    """A fresh world of ``config.world`` kind for the data of ``dm`` (after ``setup``)."""
    if config.world != "conditional":  # other kinds: ``from_config`` of the registered class
        from models.checkpoint import _world_class

        return _world_class(config.world).from_config(config, dm)
    from models.worlds._build import resolve_backbone
    from models.worlds.conditional import Conditional, ConditionalSpec, spec_fields

    spec = ConditionalSpec(
        history=config.history,
        backbone=resolve_backbone(config.backbone, dm.state_shape),
        **spec_fields(config, dm),
    )
    world = Conditional(spec)
    world.set_normalisation(dm.stats)
    return world


def fit(
    config: TrainConfig,
    data: xr.Dataset | xr.DataArray | None = None,
    callbacks: list[L.Callback] | None = None,
) -> tuple[WorldModule, L.Trainer, WindowDataModule]:
    """Seed, build data + world, and run ``Trainer.fit`` (resuming from ``ckpt_path``)."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    if config.world != "conditional":  # multi-frame kinds set the window length (history)
        from models.checkpoint import _world_class

        config = _world_class(config.world).prepare_config(config)
    dm = WindowDataModule(config, data)
    dm.setup()
    module = WorldModule(build_world(config, dm), config.lr, config.weight_decay, config.ema_decay)
    log_dir = Path(config.log_dir) if config.log_dir else Path(config.out).parent / "lightning_logs"
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        max_epochs=config.epochs if config.steps < 0 else -1,
        max_steps=config.steps,
        max_time=None if config.max_minutes is None else {"minutes": config.max_minutes},
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        logger=CSVLogger(str(log_dir), name=Path(config.out).stem),
        callbacks=[ModelCheckpoint(save_last=True), *(callbacks or [])],
        log_every_n_steps=config.log_every,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=config.ckpt_path)
    return module, trainer, dm


def train_world(
    config: TrainConfig,
    data: xr.Dataset | xr.DataArray | None = None,
    meta: dict | None = None,
) -> Path:
    """Train a world model and write its checkpoint to ``config.out`` (rank 0 only).

    Returns the checkpoint path. ``meta`` (plain data) is stored in the checkpoint
    together with the training configuration, steps and wall time.
    """
    t0 = time.perf_counter()
    module, trainer, dm = fit(config, data)
    if trainer.is_global_zero:
        info = {"global_steps": int(trainer.global_step)}
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        export(config, module, dm, trainer.strategy.root_device, {**info, **(meta or {})})
    return Path(config.out)


def export(
    config: TrainConfig,
    module: WorldModule,
    dm: WindowDataModule,
    device: torch.device | str = "cpu",
    meta: dict | None = None,
) -> Path:
    """Calibrate the EMA world of ``module`` on ``dm``'s validation pairs (on ``device``,
    the training device: a big grid's calibration on a CPU takes minutes) and write it,
    on CPU, to ``config.out`` with the training configuration in its metadata."""
    world = module.export_world().eval().to(device)
    if config.calibrate:
        hist, nxt = validation_pairs(dm, max_items=1024)
        with torch.no_grad():
            world.calibrate(hist.to(device), nxt.to(device))
    info = {
        # file locations are this machine's business: keep only their names
        "train_config": {
            k: (Path(v).name if k in ("out", "log_dir", "data") and isinstance(v, str) else v)
            for k, v in dataclasses.asdict(config).items()
            if v is not None
        },
        "torch": str(torch.__version__),
        **(meta or {}),
    }
    save_checkpoint(world.cpu(), Path(config.out), meta=info)
    return Path(config.out)


def export_lightning(
    config: TrainConfig,
    ckpt_path: str | os.PathLike,
    data: xr.Dataset | xr.DataArray | None = None,
    meta: dict | None = None,
) -> Path:
    """Write the world checkpoint of a Lightning training checkpoint (``last.ckpt`` of a
    run that stopped before its export, e.g. killed at a time limit): the same world as
    :func:`train_world` would have written at that step, calibrated on ``data``'s
    validation split (``data`` as for :func:`fit`; its statistics are replaced by the
    trained ones)."""
    if config.world != "conditional":
        from models.checkpoint import _world_class

        config = _world_class(config.world).prepare_config(config)
    dm = WindowDataModule(config, data)
    dm.setup()
    module = WorldModule(build_world(config, dm), config.lr, config.weight_decay, config.ema_decay)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    steps = int(state.get("global_step", -1))
    return export(config, module, dm, "cpu", {"global_steps": steps, **(meta or {})})


def main(argv: list[str] | None = None) -> int:
    """``python -m models.train CONFIG.toml [key=value ...]`` (values parsed as TOML)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__, file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    for a in argv[1:]:
        overrides.update(tomllib.loads(a))
    print(train_world(TrainConfig.from_toml(argv[0], **overrides)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
