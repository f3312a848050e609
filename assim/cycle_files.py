"""Files of the nightly cycle: observation-file validation, CF-1.8 analysis /
forecast / restart datasets, the PNG quicklook, checksums.

Every file is written inside the cycle's temporary folder, which becomes visible
only by one ``os.rename`` (see :mod:`assim.cycle`); so plain writes suffice here, and
each file is ``fsync``-ed before the rename. The netCDF files carry no timestamps
(no ``history`` attribute) so that a rerun with the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from assim.cycle_config import CycleConfig
from assim.errors import InputError
from assim.io import CONVENTIONS, member_coordinate, spatial_coords, spatial_dims

__all__ = [
    "DataError",
    "analysis_dataset",
    "forecast_dataset",
    "read_observations",
    "read_restart",
    "restart_dataset",
    "sha256",
    "spatial_dims",
    "write_netcdf",
    "versions",
    "write_quicklook",
    "write_record",
]


class DataError(InputError):
    """A bad input data file (observations, restart): exit code 65 (EX_DATAERR)."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_coords(state_shape: Sequence[int]) -> dict:
    dims = spatial_dims(state_shape)
    index = {d: np.arange(n, dtype=np.int32) for d, n in zip(dims, state_shape, strict=True)}
    return spatial_coords(tuple(state_shape), dims, index)


_TIME_ENC = {
    "units": "hours since 1970-01-01 00:00:00",
    "calendar": "proleptic_gregorian",
    "dtype": "float64",
}


def _np(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu").numpy()


def _base_attrs(cfg: CycleConfig, t: datetime, flags: dict) -> dict:
    return {
        "Conventions": CONVENTIONS,
        "title": f"assim nightly cycle {t:%Y-%m-%dT%H:%M}Z",
        "source": f"world {cfg.world.source}; method {cfg.method.name}",
        "institution": "assim",
        "cold_start": int(flags["cold_start"]),
        "forecast_only": int(flags["forecast_only"]),
    }


def analysis_dataset(
    cfg: CycleConfig, t: datetime, x: Tensor, log_w: Tensor, diag: dict, flags: dict, units: str
) -> xr.Dataset:
    """Analysis ensemble ``x`` ``(N, *S)`` at the cycle time, its log-weights, and the
    per-step diagnostics ``ess`` and ``log_evidence`` (``obs_time`` dimension)."""
    dims = ("member", *spatial_dims(x.shape[1:]))
    obs_times = np.array(diag["times"], dtype="datetime64[ns]")
    ds = xr.Dataset(
        {
            "state": (dims, _np(x), {"long_name": "analysis ensemble", "units": units}),
            "log_weight": (
                "member",
                _np(log_w),
                {"long_name": "normalised log-weight", "units": "1"},
            ),
            "ess": (
                "obs_time",
                np.asarray(diag["ess"], dtype=np.float64),
                {"long_name": "effective sample size after each analysis", "units": "1"},
            ),
            "log_evidence": (
                "obs_time",
                np.asarray(diag["log_z"], dtype=np.float64),
                {"long_name": "log evidence increment log p(y_k | y_1:k-1)", "units": "1"},
            ),
        },
        coords={
            "member": member_coordinate(x.shape[0]),
            **_space_coords(x.shape[1:]),
            "time": ((), np.datetime64(t, "ns"), {"standard_name": "time", "axis": "T"}),
            "obs_time": ("obs_time", obs_times, {"long_name": "analysis step time"}),
        },
        attrs=_base_attrs(cfg, t, flags),
    )
    return ds


def forecast_dataset(
    cfg: CycleConfig, t: datetime, x: Tensor, log_w: Tensor, flags: dict, units: str
) -> xr.Dataset:
    """Forecast ensemble ``x`` ``(N, K, *S)`` at leads ``1..K`` steps after ``t``, with
    ``forecast_reference_time`` and ``forecast_period`` (hours) as in CF."""
    n_steps = x.shape[1]
    step_h = cfg.interval_hours / cfg.steps_per_cycle
    lead = np.arange(1, n_steps + 1, dtype=np.float64) * step_h
    valid = np.array([t + timedelta(hours=float(h)) for h in lead], dtype="datetime64[ns]")
    dims = ("member", "time", *spatial_dims(x.shape[2:]))
    return xr.Dataset(
        {
            "state": (dims, _np(x), {"long_name": "forecast ensemble", "units": units}),
            "log_weight": (
                "member",
                _np(log_w),
                {"long_name": "normalised log-weight", "units": "1"},
            ),
        },
        coords={
            "member": member_coordinate(x.shape[0]),
            **_space_coords(x.shape[2:]),
            "time": ("time", valid, {"standard_name": "time", "axis": "T"}),
            "forecast_reference_time": (
                (),
                np.datetime64(t, "ns"),
                {"standard_name": "forecast_reference_time"},
            ),
            "forecast_period": (
                "time",
                lead,
                {"standard_name": "forecast_period", "units": "hours"},
            ),
        },
        attrs=_base_attrs(cfg, t, flags),
    )


def restart_dataset(
    cfg: CycleConfig, t: datetime, x: Tensor, log_w: Tensor, flags: dict, units: str
) -> xr.Dataset:
    """The analysis ensemble at full precision: next cycle's starting point."""
    ds = analysis_dataset(cfg, t, x, log_w, {"times": [], "ess": [], "log_z": []}, flags, units)
    ds = ds.drop_vars(["ess", "log_evidence", "obs_time"])
    ds["state"].attrs["long_name"] = "restart ensemble (analysis)"
    ds.attrs["title"] = ds.attrs["title"].replace("cycle", "cycle restart")
    return ds


def write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Write ``ds`` (no history attribute => same bytes for same content) and fsync."""
    enc = {v: {"_FillValue": None} for v in ds.variables if ds[v].dtype.kind == "f"}
    for v in ds.variables:
        if ds[v].dtype.kind == "M":
            enc[v] = dict(_TIME_ENC)
    ds.to_netcdf(path, engine="netcdf4", format="NETCDF4", encoding=enc)
    fsync_path(path)


def read_restart(
    path: Path, members: int, state_shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Read ``(x (N, *S), log_w (N,))`` from a restart file, checking the shape."""
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            x = np.asarray(ds["state"].values)
            log_w = np.asarray(ds["log_weight"].values)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read the restart ensemble ({exc})") from None
    want = (members, *state_shape)
    if x.shape != want or log_w.shape != (members,):
        raise DataError(
            f"{path}: restart ensemble has shape {x.shape}, the config needs "
            f"{want} (members, *state)"
        )
    if not (np.isfinite(x).all() and np.isfinite(log_w).all()):
        raise DataError(f"{path}: restart ensemble contains NaN or infinite values")
    return (
        torch.from_numpy(x).to(device=device, dtype=dtype),
        torch.from_numpy(log_w).to(device=device, dtype=dtype),
    )


def read_observations(
    path: Path,
    cfg: CycleConfig,
    t: datetime,
    m: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Read and check the observation file of cycle ``t``.

    The file holds ``variable`` with dims ``(time, ...)`` whose trailing sizes
    multiply to ``m`` (the operator's output size, C order), in ``units``; its times
    lie in the window ``(t - interval, t]`` on the step grid, unique. Returns
    ``{k: y_k (m,)}`` for the steps ``k = 1..steps_per_cycle`` that have data.
    Every problem raises :class:`DataError` naming the file.
    """
    spec = cfg.observations
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            names = sorted(map(str, ds.data_vars))
            if spec.variable not in ds.variables:
                raise DataError(
                    f"{path}: variable '{spec.variable}' not found "
                    f"(file has: {', '.join(names) or 'no variables'})"
                )
            da = ds[spec.variable].load()
    except DataError:
        raise
    except Exception as exc:  # netCDF4/HDF5/xarray raise many types on corrupt files
        raise DataError(
            f"{path}: cannot read observation file ({type(exc).__name__}: {exc})"
        ) from None
    units = da.attrs.get("units")
    if units != spec.units:
        raise DataError(
            f"{path}: variable '{spec.variable}' has units {units!r}, expected {spec.units!r}"
        )
    shape = dict(zip(da.dims, da.shape, strict=True))
    if not da.dims or da.dims[0] != "time" or math.prod(da.shape[1:]) != m:
        raise DataError(
            f"{path}: variable '{spec.variable}' has dims {shape}, expected "
            f"(time, ...) with {m} values per time (operator "
            f"'{spec.operator}' on the world state)"
        )
    if "time" not in da.coords or da["time"].dtype.kind != "M":
        raise DataError(f"{path}: variable '{spec.variable}' has no decodable CF time coordinate")
    times = [
        datetime.fromisoformat(str(np.datetime_as_string(v, unit="s"))) for v in da["time"].values
    ]
    dup = sorted({s for s in times if times.count(s) > 1})
    if dup:
        raise DataError(
            f"{path}: duplicated observation times: {', '.join(f'{d:%Y-%m-%dT%H:%M}' for d in dup)}"
        )
    values = np.asarray(da.values, dtype=np.float64).reshape(len(times), m)
    if np.isnan(values).all():
        raise DataError(f"{path}: variable '{spec.variable}' is all NaN")
    if np.isinf(values).any():
        raise DataError(f"{path}: variable '{spec.variable}' contains infinite values")
    out: dict[int, Tensor] = {}
    t0, step = t - cfg.interval, cfg.step
    for s, row in zip(times, values, strict=True):
        k = (s - t0) / step
        if not (t0 < s <= t):
            raise DataError(
                f"{path}: observation time {s:%Y-%m-%dT%H:%M} is outside the "
                f"cycle window ({t0:%Y-%m-%dT%H:%M}, {t:%Y-%m-%dT%H:%M}]"
            )
        if abs(k - round(k)) > 1e-6:
            raise DataError(
                f"{path}: observation time {s:%Y-%m-%dT%H:%M} is not on the "
                f"model step grid (every {cfg.interval_hours / cfg.steps_per_cycle:g} "
                f"h from {t0:%Y-%m-%dT%H:%M})"
            )
        out[round(k)] = torch.as_tensor(row, dtype=dtype, device=device)
    return out


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    import importlib.metadata as md

    out = [("python", platform.python_version())]
    for name in ("assim", "torch", "numpy", "xarray", "netCDF4", "matplotlib"):
        try:
            out.append((name, md.version(name)))
        except md.PackageNotFoundError:
            out.append((name, getattr(__import__(name), "__version__", "unknown")))
    return tuple(out)


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the outputs (run record)."""
    return dict(_versions())


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not (v == v and abs(v) != float("inf")):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


def write_record(path: Path, record: dict) -> None:
    """The JSON run record (NaN/inf as null), fsync-ed."""
    text = json.dumps(_json_safe(record), indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")
    fsync_path(path)


def write_quicklook(
    path: Path,
    t: datetime,
    analysis: Tensor,
    forecast: Tensor | None,
    obs_last: Tensor | None,
    flags: dict,
    title: str,
) -> None:
    """A PNG: 1-D states show the analysis mean ± spread (and the last observations
    when they are on the state grid), plus a Hovmöller of the forecast mean; 2-D states
    show the analysis mean and the last forecast mean."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    mean = _np(analysis.mean(0))
    std = _np(analysis.std(0)) if analysis.shape[0] > 1 else mean * 0
    tag = " [cold start]" if flags["cold_start"] else ""
    tag += " [forecast only]" if flags["forecast_only"] else ""
    ncols = 2 if forecast is not None and forecast.shape[1] > 0 else 1
    fig = Figure(figsize=(5 * ncols, 3.6))
    axes = fig.subplots(1, ncols, squeeze=False)
    ax = axes[0, 0]
    if mean.ndim == 1:
        i = np.arange(mean.size)
        ax.fill_between(i, mean - std, mean + std, alpha=0.3, label="± spread")
        ax.plot(i, mean, label="analysis mean")
        if obs_last is not None and obs_last.numel() == mean.size:
            ax.plot(i, _np(obs_last), ".", ms=4, label="observations")
        ax.set_xlabel("grid index")
        ax.legend(fontsize=7)
    else:
        im = ax.imshow(mean.reshape(mean.shape[-2], -1), origin="lower")
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"analysis {t:%Y-%m-%d %H}Z{tag}", fontsize=9)
    if ncols == 2:
        ax = axes[0, 1]
        fmean = _np(forecast.mean(0))
        if fmean.ndim == 2:
            im = ax.imshow(fmean, aspect="auto", origin="lower", interpolation="nearest")
            ax.set_xlabel("grid index")
            ax.set_ylabel("forecast step")
            ax.set_title("forecast mean (Hovmöller)", fontsize=9)
        else:
            last = fmean[-1]
            im = ax.imshow(last.reshape(last.shape[-2], -1), origin="lower")
            ax.set_title(f"forecast mean, step {fmean.shape[0]}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.14, top=0.84, wspace=0.25)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    fsync_path(path)
