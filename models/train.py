"""Training of world models with Lightning over windows cut from an xarray dataset.

``train_world(config) -> path`` fits a :class:`~models.worlds.conditional.Conditional`
world on ``(x_{k-h+1..k}, x_{k+1})`` windows of one variable of a netCDF file or an
in-memory xarray object, and writes a checkpoint that :func:`models.load` turns
back into a ready world (see :mod:`models.checkpoint`; no Lightning needed to load).

* The data stay lazy (``xarray.open_dataset(..., chunks={})``, dask-backed):
  normalisation statistics are xarray reductions over the training split, and
  windows are read one at a time unless the variable is small enough to load
  (``max_in_memory_mb``).
* The split is in time: the first ``1 - val_fraction`` of every trajectory trains,
  the rest validates; statistics use the training part only.
* Seeds: :func:`lightning.seed_everything` (weights, noise draws, shuffling).
* Multi-device: any Lightning strategy (``strategy="ddp"``, ``devices=2``); the
  distributed sampler is inserted by Lightning and only rank 0 writes the file.
* Resume: ``ckpt_path`` (a Lightning ``.ckpt`` from ``<log_dir>/checkpoints``).

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
import numpy as np
import torch
import xarray as xr
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from models.checkpoint import save as save_checkpoint

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


# ----------------------------------------------------------------------------- data


def _select(data: xr.Dataset | xr.DataArray, variable: str | None) -> xr.DataArray:
    if isinstance(data, xr.DataArray):
        if variable is not None and data.name is not None and data.name != variable:
            raise ValueError(f"data variable is {data.name!r}, config asks for {variable!r}")
        return data
    names = list(data.data_vars)
    if variable is None:
        if len(names) != 1:
            raise ValueError(f"dataset has variables {names}; set `variable` to one of them")
        variable = names[0]
    if variable not in data.data_vars:
        raise ValueError(f"variable {variable!r} not in dataset (it has {names})")
    return data[variable]


class WindowDataset(Dataset):
    """Windows ``(x_{k-h+1..k}, x_{k+1})`` of ``da`` ``(B, T, *S)`` with ``k + 1`` in
    ``[start + h, stop)``; items are float32 tensors ``(h, *S)`` and ``(*S)``."""

    def __init__(self, da: xr.DataArray | Tensor, history: int, start: int, stop: int):
        self.da, self.h, self.start = da, history, start
        self.n_traj = da.shape[0]
        self.per_traj = max(stop - start - history, 0)

    def __len__(self) -> int:
        return self.n_traj * self.per_traj

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        b, k = divmod(int(i), self.per_traj)
        a = self.start + k
        if isinstance(self.da, Tensor):
            w = self.da[b, a : a + self.h + 1]
        else:  # lazy (dask/netCDF-backed): read just this window
            w = torch.from_numpy(np.asarray(self.da[b, a : a + self.h + 1].values, np.float32))
        return w[: self.h], w[self.h]


class WindowDataModule(L.LightningDataModule):
    """Cuts training / validation windows from one variable of an xarray object.

    Grid dims are all dims except ``time_dim`` (and ``sample_dim``). After
    :meth:`setup`, ``stats`` holds the training-split normalisation (tensors of
    the grid shape): ``state_mean/state_std`` of ``x_k`` and ``target_mean/target_std``
    of the target (``x_{k+1} - x_k`` or ``x_{k+1}``).
    """

    def __init__(self, config: TrainConfig, data: xr.Dataset | xr.DataArray | None = None):
        super().__init__()
        self.config = config
        self._data = data
        self.da: xr.DataArray | None = None
        self.stats: dict[str, Tensor] = {}

    # -- metadata of the selected variable
    def prepare_array(self) -> xr.DataArray:
        c = self.config
        data = self._data
        if data is None:
            if not c.data:
                raise ValueError("no training data: set `data` (a netCDF path) in the config")
            if not Path(c.data).is_file():
                raise ValueError(f"training data {c.data!r} does not exist")
            data = xr.open_dataset(c.data, chunks={})
        da = _select(data, c.variable)
        if c.time_dim not in da.dims:
            raise ValueError(f"variable {da.name!r} has dims {da.dims}, no time dim {c.time_dim!r}")
        if c.sample_dim is None:
            da = da.expand_dims("_trajectory")
            sample = "_trajectory"
        else:
            if c.sample_dim not in da.dims:
                raise ValueError(f"variable {da.name!r} has no sample dim {c.sample_dim!r}")
            sample = c.sample_dim
        grid = tuple(d for d in da.dims if d not in (c.time_dim, sample))
        da = da.transpose(sample, c.time_dim, *grid)
        if da.nbytes <= c.max_in_memory_mb * 2**20:
            da = da.load()
        return da

    @property
    def grid_dims(self) -> tuple[str, ...]:
        return tuple(str(d) for d in self.da.dims[2:])

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.da.shape[2:])

    @property
    def variable(self) -> str:
        return str(self.da.name) if self.da.name is not None else "x"

    @property
    def dt(self) -> float:
        """Step length: ``config.dt``, else the spacing of a ``model_time`` coordinate
        (CF simulation files, see ``assim.io``), else of a numeric time, else days."""
        if self.config.dt is not None:
            return float(self.config.dt)
        tdim = self.config.time_dim
        coord = self.da.coords.get("model_time", self.da[tdim])
        t = np.asarray(coord.values)
        if t.size < 2:
            raise ValueError("cannot infer dt from fewer than 2 times; set `dt` in the config")
        if np.issubdtype(t.dtype, np.datetime64):
            d = (np.diff(t) / np.timedelta64(1, "D")).astype(float)
        elif np.issubdtype(t.dtype, np.number):
            d = np.diff(t.astype(float))
        else:
            raise ValueError(f"cannot infer dt from times of dtype {t.dtype}; set `dt`")
        if not np.allclose(d, d[0], rtol=1e-5):
            raise ValueError("time coordinate is not uniformly spaced; windows need a fixed dt")
        return float(d[0])

    def _split(self) -> int:
        n_time = self.da.shape[1]
        n_train = int(round(n_time * (1.0 - self.config.val_fraction)))
        if n_train < self.config.history + 2 or n_time - n_train < self.config.history + 1:
            raise ValueError(
                f"{n_time} time steps are too few for history {self.config.history} "
                f"and val_fraction {self.config.val_fraction}"
            )
        return n_train

    def setup(self, stage: str | None = None) -> None:
        if self.da is not None:
            return
        self.da = self.prepare_array()
        c = self.config
        n_train = self._split()
        train = self.da.isel({c.time_dim: slice(0, n_train)})
        state = train
        target = train.diff(c.time_dim) if c.target == "increment" else train
        reduce = ("_trajectory" if c.sample_dim is None else c.sample_dim, c.time_dim)
        if c.normalise == "global":
            reduce = tuple(train.dims)
        stats = {}
        for name, arr in (("state", state), ("target", target)):
            mean = arr.mean(reduce).compute()
            std = arr.std(reduce).compute()
            shape = self.state_shape
            stats[f"{name}_mean"] = torch.as_tensor(np.broadcast_to(mean.values, shape).copy())
            stats[f"{name}_std"] = torch.as_tensor(np.broadcast_to(std.values, shape).copy())
        for k, v in stats.items():
            v = v.float()
            if not torch.isfinite(v).all():
                raise ValueError(
                    f"normalisation {k} of {self.variable!r} is not finite (NaN data?)"
                )
            stats[k] = v
        for k in ("state_std", "target_std"):
            stats[k] = stats[k].clamp_min(1e-6 * float(stats[k].abs().max().clamp_min(1e-30)))
        self.stats = stats
        values: xr.DataArray | Tensor = self.da
        if self.da.chunks is None:  # loaded: index a tensor, not xarray, per item
            values = torch.from_numpy(np.ascontiguousarray(self.da.values, dtype=np.float32))
        self.train_set = WindowDataset(values, c.history, 0, n_train)
        self.val_set = WindowDataset(values, c.history, n_train, self.da.shape[1])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.config.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) > self.config.batch_size,
            num_workers=self.config.num_workers,
            generator=g,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=max(self.config.batch_size, 256),
            shuffle=False,
            num_workers=self.config.num_workers,
        )


# ----------------------------------------------------------------------------- module


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
    from models.worlds.conditional import Conditional, ConditionalSpec

    spec = ConditionalSpec(
        state_shape=dm.state_shape,
        dt=dm.dt,
        history=config.history,
        target=config.target,
        backbone=resolve_backbone(config.backbone, dm.state_shape),
        backbone_kwargs=dict(config.backbone_kwargs),
        schedule=config.schedule,
        schedule_kwargs=dict(config.schedule_kwargs),
        sigma_data=config.sigma_data,
        sampler=config.sampler,
        steps=config.diffusion_steps,
        eta=config.eta,
        q=config.q,
        variable=dm.variable,
        dims=dm.grid_dims,
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
    out = Path(config.out)
    if trainer.is_global_zero:
        world = module.export_world().cpu().eval()
        if config.calibrate:
            world.calibrate(*validation_pairs(dm))
        info = {
            "train_config": {k: v for k, v in dataclasses.asdict(config).items() if v is not None},
            "global_steps": int(trainer.global_step),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "torch": str(torch.__version__),
            **(meta or {}),
        }
        save_checkpoint(world, out, meta=info)
    return out


def validation_pairs(dm: WindowDataModule, max_items: int = 4096) -> tuple[Tensor, Tensor]:
    """Up to ``max_items`` evenly spaced validation windows ``((n, h, *S), (n, *S))``."""
    n = min(len(dm.val_set), max_items)
    idx = np.linspace(0, len(dm.val_set) - 1, n).astype(int)
    hist, nxt = zip(*(dm.val_set[int(i)] for i in idx), strict=True)
    return torch.stack(hist), torch.stack(nxt)


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
