"""Training data for world models: ``(history, next)`` windows cut from xarray.

:class:`WindowDataModule` (a Lightning data module) selects one variable of a
dataset (lazy/dask-backed or in memory), splits it in time, computes the
normalisation statistics on the training part only (xarray reductions, so dask
arrays stay lazy) and serves windows ``(x_{k-h+1..k}, x_{k+1})``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
import xarray as xr
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from models.train import TrainConfig


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


def validation_pairs(dm: WindowDataModule, max_items: int = 4096) -> tuple[Tensor, Tensor]:
    """Up to ``max_items`` evenly spaced validation windows ``((n, h, *S), (n, *S))``."""
    n = min(len(dm.val_set), max_items)
    idx = np.linspace(0, len(dm.val_set) - 1, n).astype(int)
    hist, nxt = zip(*(dm.val_set[int(i)] for i in idx), strict=True)
    return torch.stack(hist), torch.stack(nxt)
