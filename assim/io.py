"""CF-1.8 netCDF input/output through xarray (DESIGN.md §2 "I/O").

- :func:`write_dataset` writes atomically: a temporary file in the same folder,
  then ``os.replace``; on failure the temporary file is removed and an existing
  file at the destination is left untouched.
- :func:`read_dataset` / :func:`validate_dataset` check a dataset before any work
  starts and raise :class:`~assim.errors.InputError` naming the file and what was
  expected (unreadable file, missing variable, wrong dims, non-monotonic or
  duplicated time, all-NaN field).
- :func:`trajectory_dataset`, :func:`ensemble_dataset`, :func:`forecast_dataset`
  build CF datasets from arrays or tensors.

Time convention for simulations: model time ``t`` (nondimensional, "MTU") is
stored as ``days since 2000-01-01 00:00:00`` (proleptic Gregorian), i.e. one MTU
is one day, and the raw value is kept in the auxiliary coordinate ``model_time``.
Datetime-like times (``numpy.datetime64``, ``cftime``) are stored as they are,
with their calendar.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import xarray as xr

from assim.errors import InputError

CONVENTIONS = "CF-1.8"
MODEL_TIME_UNITS = "days since 2000-01-01 00:00:00"
MODEL_TIME_CALENDAR = "proleptic_gregorian"
_MODEL_EPOCH = np.datetime64("2000-01-01T00:00:00", "ns")

# Attributes of well-known spatial dimensions; anything else gets units "1".
_SPATIAL_ATTRS: dict[str, dict[str, str]] = {
    "lat": {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"},
    "lon": {"standard_name": "longitude", "units": "degrees_east", "axis": "X"},
    "x": {"units": "1", "axis": "X", "long_name": "grid index along x"},
    "y": {"units": "1", "axis": "Y", "long_name": "grid index along y"},
    "z": {"units": "1", "axis": "Z", "long_name": "grid index along z"},
}

PathLike = str | os.PathLike


# ----------------------------------------------------------------- writing


def write_dataset(ds: xr.Dataset, path: PathLike) -> Path:
    """Write ``ds`` to netCDF-4 at ``path`` atomically and return the path.

    Adds ``Conventions = "CF-1.8"`` when absent. The parent folder is created.
    Raises :class:`InputError` naming ``path`` when the file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the folder {path.parent} ({exc})") from exc
    ds = ds.copy(deep=False)
    ds.attrs.setdefault("Conventions", CONVENTIONS)
    for name in ds.coords:  # CF: coordinate variables carry no fill value
        if name in ds.dims or ds[name].dtype.kind in "fiumM":
            ds[name].encoding.setdefault("_FillValue", None)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write netCDF ({type(exc).__name__}: {exc})") from exc
    return path


# ----------------------------------------------------------------- reading


def read_dataset(
    path: PathLike,
    var: str | None = None,
    dims: Sequence[str] | None = None,
    *,
    units: str | None = None,
    use_cftime: bool | None = None,
) -> xr.Dataset:
    """Open, load into memory and validate a netCDF file (see :func:`validate_dataset`).

    ``use_cftime=True`` decodes every calendar to ``cftime`` objects; ``None`` (default)
    uses ``numpy.datetime64`` for standard calendars and cftime otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        coder = xr.coders.CFDatetimeCoder(use_cftime=use_cftime)
        with xr.open_dataset(
            path, engine="netcdf4", decode_times=coder, decode_timedelta=True
        ) as ds:
            ds = ds.load()
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read as netCDF ({type(exc).__name__}: {exc}); "
            "expected a readable netCDF-4/3 file"
        ) from exc
    validate_dataset(ds, var=var, dims=dims, units=units, source=str(path))
    return ds


def validate_dataset(
    ds: xr.Dataset,
    var: str | None = None,
    dims: Sequence[str] | None = None,
    source: str = "dataset",
    units: str | None = None,
) -> None:
    """Check ``ds`` and raise :class:`InputError` starting with ``source``.

    - ``var`` (when given) exists, and has exactly ``dims`` in that order (when given)
      and the ``units`` attribute ``units`` (when given);
    - a ``time`` coordinate, if present, is strictly increasing (no duplicates);
    - the checked field (``var``, or every floating data variable) is not all NaN.
    """
    if var is not None:
        choose_variable(ds, source, var)
    if dims is not None:
        if var is None:
            raise ValueError("validate_dataset: dims needs var")
        have = tuple(map(str, ds[var].dims))
        if have != tuple(dims):
            raise InputError(f"{source}: variable {var!r} has dims {have}; expected {tuple(dims)}")
    if units is not None:
        if var is None:
            raise ValueError("validate_dataset: units needs var")
        have_units = ds[var].attrs.get("units")
        if have_units != units:
            raise InputError(
                f"{source}: variable {var!r} has units {have_units!r}; expected {units!r}"
            )
    if "time" in ds.variables:
        _check_time(ds["time"].values, source)
    names = [var] if var is not None else [str(v) for v in ds.data_vars]
    for name in names:
        values = ds[name].values
        if values.dtype.kind in "fc" and values.size and np.isnan(values).all():
            raise InputError(f"{source}: variable {name!r} is all NaN; expected some valid values")


def choose_variable(
    ds: xr.Dataset, source: str, variable: str | None = None, hint: str = ""
) -> str:
    """``variable`` if ``ds`` has it, or the only data variable when ``variable`` is None;
    otherwise :class:`InputError` naming ``source`` and the variables it has (``hint`` is
    appended to the not-found message)."""
    names = sorted(map(str, ds.data_vars))
    if variable is None:
        if len(names) != 1:
            raise InputError(f"{source}: several variables {names}; choose one with --variable")
        return names[0]
    if variable not in ds.data_vars:
        raise InputError(f"{source}: variable {variable!r} not found; available: {names}{hint}")
    return variable


def _check_time(t: np.ndarray, source: str) -> None:
    if t.ndim != 1 or t.size < 2:
        return
    later, earlier = t[1:], t[:-1]
    same = np.asarray(later == earlier)
    if same.any():
        i = int(np.argmax(same))
        raise InputError(
            f"{source}: time has duplicated values ({t[i]} at positions {i} and {i + 1}); "
            "expected strictly increasing times"
        )
    bad = ~np.asarray(later > earlier)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            f"{source}: time is not monotonic increasing (position {i}: {t[i]}, "
            f"position {i + 1}: {t[i + 1]}); expected strictly increasing times"
        )


# --------------------------------------------------------------- building


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def time_coords(times: Any) -> dict[str, xr.DataArray]:
    """CF ``time`` coordinate (plus auxiliaries) from model times or datetime-likes.

    Numbers ``t`` become ``2000-01-01 + t days`` and an auxiliary ``model_time(time)``
    holds ``t``; datetime64 / cftime values are kept as they are (calendar included).
    """
    t = _numpy(times)
    if t.ndim != 1:
        raise InputError(f"times: expected a 1-D array, got shape {t.shape}")
    attrs = {"standard_name": "time", "axis": "T", "long_name": "time"}
    if t.dtype.kind in "iuf":
        t = t.astype(np.float64)
        stamps = _MODEL_EPOCH + np.round(t * 86400e9).astype("timedelta64[ns]")
        da = xr.DataArray(stamps, dims="time", attrs=attrs)
        da.encoding.update(units=MODEL_TIME_UNITS, calendar=MODEL_TIME_CALENDAR, dtype="float64")
        model = xr.DataArray(
            t, dims="time", attrs={"long_name": "nondimensional model time", "units": "1"}
        )
        return {"time": da, "model_time": model}
    return {"time": xr.DataArray(t, dims="time", attrs=attrs)}


def spatial_dims(state_shape: Sequence[int]) -> tuple[str, ...]:
    """Dimension names of a state ``S``: ``(x,)``, ``(y, x)``, ``(z, y, x)``, else
    ``dim_0, dim_1, ...``."""
    names = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}
    return names.get(len(state_shape), tuple(f"dim_{i}" for i in range(len(state_shape))))


def spatial_coords(
    shape: tuple[int, ...], dims: Sequence[str], coords: Mapping[str, Any] | None = None
) -> dict[str, xr.DataArray]:
    """CF coordinates of the spatial ``dims`` of sizes ``shape``: ``lat``/``lon``/``x``/
    ``y``/``z`` get their standard attributes, others ``units = "1"``. ``coords[d]`` is
    ``values`` or ``(values, attrs)``; a missing one is ``0..n-1``."""
    if len(shape) != len(dims):
        raise InputError(f"dims {tuple(dims)} do not match the spatial shape {shape}")
    out: dict[str, xr.DataArray] = {}
    coords = dict(coords or {})
    for d, n in zip(dims, shape, strict=True):
        attrs = dict(_SPATIAL_ATTRS.get(d, {"units": "1", "long_name": f"index along {d}"}))
        spec = coords.get(d)
        if isinstance(spec, tuple):
            values, extra = spec
            attrs.update(extra)
        elif spec is not None:
            values = spec
        else:
            values = np.arange(n)
        values = _numpy(values)
        if values.shape != (n,):
            raise InputError(f"coordinate {d!r}: expected {n} values, got shape {values.shape}")
        out[d] = xr.DataArray(values, dims=d, attrs=attrs)
    return out


class VarMeta(TypedDict, total=False):
    """Optional keywords shared by the dataset builders.

    ``name`` (default ``"state"``), ``units`` (default ``"1"``), ``long_name`` (default
    ``name``), ``standard_name``, ``coords`` (``coords[d]`` is ``values`` or
    ``(values, attrs)`` for a spatial dim ``d``) and global ``attrs``.
    """

    name: str
    units: str
    long_name: str | None
    standard_name: str | None
    coords: Mapping[str, Any] | None
    attrs: Mapping[str, Any] | None


def _meta_name(meta: VarMeta) -> str:
    """The variable name in ``meta``; unknown keywords are a ``TypeError`` as usual."""
    unknown = set(meta) - set(VarMeta.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return meta.get("name", "state")


def _cf_dataset(
    a: np.ndarray,
    dims: tuple[str, ...],
    coords: dict[str, xr.DataArray],
    meta: VarMeta,
) -> xr.Dataset:
    """One-variable CF dataset: ``meta["name"]`` with its units/long_name/standard_name."""
    name = _meta_name(meta)
    var_attrs = {"units": meta.get("units", "1"), "long_name": meta.get("long_name") or name}
    if meta.get("standard_name"):
        var_attrs["standard_name"] = meta["standard_name"]
    da = xr.DataArray(a, dims=dims, coords=coords, attrs=var_attrs)
    attrs = {"Conventions": CONVENTIONS, **dict(meta.get("attrs") or {})}
    return xr.Dataset({name: da}, attrs=attrs)


def trajectory_dataset(
    x: Any,
    times: Any,
    dims: Sequence[str],
    **meta: Unpack[VarMeta],
) -> xr.Dataset:
    """CF dataset with one variable ``name`` of dims ``(time, *dims)`` from ``x``
    ``(T, *S)`` (numpy or torch); keywords as in :class:`VarMeta`."""
    name = _meta_name(meta)
    a = _numpy(x)
    tc = time_coords(times)
    nt = tc["time"].size
    if a.ndim != 1 + len(dims) or a.shape[0] != nt:
        raise InputError(
            f"{name}: expected an array (time={nt}, {', '.join(dims)}), got shape {a.shape}"
        )
    c = {**tc, **spatial_coords(a.shape[1:], dims, meta.get("coords"))}
    return _cf_dataset(a, ("time", *dims), c, meta)


def member_coordinate(m: int) -> xr.DataArray:
    """``member`` coordinate ``0..m-1`` with ``standard_name = realization``."""
    return xr.DataArray(
        np.arange(m, dtype=np.int32),
        dims="member",
        attrs={"standard_name": "realization", "long_name": "ensemble member", "units": "1"},
    )


def ensemble_dataset(
    x: Any,
    times: Any,
    dims: Sequence[str],
    **meta: Unpack[VarMeta],
) -> xr.Dataset:
    """CF dataset with ``name`` of dims ``(time, member, *dims)`` from ``x``
    ``(T, M, *S)`` (e.g. analysis ensembles stacked over cycles)."""
    name = _meta_name(meta)
    a = _numpy(x)
    if a.ndim != 2 + len(dims):
        raise InputError(f"{name}: expected (time, member, {', '.join(dims)}), got shape {a.shape}")
    tc = time_coords(times)
    if a.shape[0] != tc["time"].size:
        raise InputError(f"{name}: {a.shape[0]} time steps but {tc['time'].size} times")
    c = {
        **tc,
        "member": member_coordinate(a.shape[1]),
        **spatial_coords(a.shape[2:], dims, meta.get("coords")),
    }
    dims_all = ("time", "member", *dims)
    return _cf_dataset(a, dims_all, c, meta)


def forecast_dataset(
    x: Any,
    reference_time: Any,
    lead_times: Any,
    dims: Sequence[str],
    **meta: Unpack[VarMeta],
) -> xr.Dataset:
    """CF forecast dataset from ``x`` ``(M, L, *S)`` (as returned by
    ``World.forecast``): ``name`` has dims ``(time, member, *dims)`` where ``time``
    is the valid time, with the scalar ``forecast_reference_time`` and the
    auxiliary ``forecast_period(time)`` (lead). Numeric reference/lead times are
    model times (see the module docstring); otherwise a datetime and timedeltas."""
    name = _meta_name(meta)
    a = _numpy(x)
    if a.ndim != 2 + len(dims):
        raise InputError(f"{name}: expected (member, lead, {', '.join(dims)}), got shape {a.shape}")
    lead = _numpy(lead_times)
    if lead.shape != (a.shape[1],):
        raise InputError(f"lead_times: expected {a.shape[1]} values, got shape {lead.shape}")
    ref = _numpy(reference_time)
    if ref.dtype.kind in "iuf" and lead.dtype.kind in "iuf":
        tc = time_coords(float(ref) + lead.astype(np.float64))
        ref_da = xr.DataArray(time_coords(np.array([float(ref)]))["time"].values[0])
        ref_da.encoding.update(
            units=MODEL_TIME_UNITS, calendar=MODEL_TIME_CALENDAR, dtype="float64"
        )
        period = np.round(lead.astype(np.float64) * 86400e9).astype("timedelta64[ns]")
    else:
        period = lead.astype("timedelta64[ns]")
        tc = time_coords(ref[()] + period)
        ref_da = xr.DataArray(ref[()])
    ref_da.attrs.update(
        standard_name="forecast_reference_time", long_name="forecast reference time"
    )
    fp = xr.DataArray(
        period, dims="time", attrs={"standard_name": "forecast_period", "long_name": "lead time"}
    )
    fp.encoding.update(units="hours", dtype="float64")
    c = {
        **tc,
        "member": member_coordinate(a.shape[0]),
        "forecast_period": fp,
        "forecast_reference_time": ref_da,
        **spatial_coords(a.shape[2:], dims, meta.get("coords")),
    }
    a = np.moveaxis(a, 0, 1)
    dims_all = ("time", "member", *dims)
    return _cf_dataset(a, dims_all, c, meta)
