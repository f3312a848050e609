"""The dataset catalogue (``datasets/catalog.toml``): generated sets and real grids.

- :func:`list_datasets` — names and one-line descriptions;
- :func:`prepare` — write ``NAME.nc`` (CF-1.8) into the cache folder and return its
  path; a rerun with an unchanged recipe is a no-op;
- :func:`load` — prepare, then read and validate;
- :func:`simulate_dataset` — the generated sets' recipe as a function (also behind
  ``assim simulate``).

Cache folder: ``$ASSIM_DATA_DIR`` if set, else the user cache dir (``$XDG_CACHE_HOME``
or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on
Windows) + ``/assim``. Real grids are found through ``importlib.resources`` in
their PyPI packages (extra ``data``), never through a machine path.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from assim import io
from assim.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CATALOG = Path(__file__).resolve().parents[1] / "datasets" / "catalog.toml"

# system -> (variable name, spatial dims, long name)
SYSTEMS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "l63": ("state", ("component",), "Lorenz-63 state"),
    "l96": ("state", ("x",), "Lorenz-96 state"),
    "kolmogorov": ("vorticity", ("y", "x"), "relative vorticity"),
}


# ---------------------------------------------------------------- catalogue


def read_catalog(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The catalogue as ``{name: recipe}`` (``datasets/catalog.toml`` by default)."""
    path = Path(path) if path is not None else CATALOG
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: dataset catalogue not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML ({exc})") from exc


def list_datasets(catalog: str | os.PathLike | None = None) -> dict[str, str]:
    """``{name: "kind: description"}`` for every catalogue entry."""
    return {
        name: f"{e.get('kind', '?')}: {e.get('description', '')}"
        for name, e in read_catalog(catalog).items()
    }


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The data cache folder (see the module docstring)."""
    if override is not None:
        return Path(override)
    if os.environ.get("ASSIM_DATA_DIR"):
        return Path(os.environ["ASSIM_DATA_DIR"])
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "assim"


# Bump when the conversion or simulation code changes what a recipe produces, so that
# cached files made by older code are regenerated.
FORMAT_VERSION = 1


def _recipe_sha(entry: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "recipe": entry}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stored_sha(path: Path) -> str | None:
    import netCDF4

    try:
        with netCDF4.Dataset(path) as nc:
            return str(nc.getncattr("assim_recipe_sha"))
    except Exception:
        return None


def prepare(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    catalog: str | os.PathLike | None = None,
    device: str | None = None,
) -> Path:
    """Write dataset ``name`` to ``<cache>/<name>.nc`` unless an up-to-date copy is
    there; return the path. Unknown names raise :class:`InputError` listing the known."""
    entries = read_catalog(catalog)
    if name not in entries:
        raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(entries))}")
    entry = entries[name]
    out = resolve_cache_dir(cache_dir) / f"{name}.nc"
    sha = _recipe_sha(entry)
    if out.is_file() and _stored_sha(out) == sha:
        return out
    kind = entry.get("kind")
    if kind == "generated":
        ds = _generated(entry, device)
    elif kind == "package":
        ds = _from_package(name, entry)
    else:
        raise InputError(f"dataset {name!r}: unknown kind {kind!r}; expected generated or package")
    ds.attrs.update(assim_dataset=name, assim_recipe_sha=sha)
    return io.write_dataset(ds, out)


def load(name: str, cache_dir: str | os.PathLike | None = None, **kw: Any) -> xr.Dataset:
    """Prepare dataset ``name`` and return it loaded and validated."""
    path = prepare(name, cache_dir, **kw)
    ds = io.read_dataset(path)
    var = ds.attrs.get("assim_variable")
    if var is not None:
        io.validate_dataset(ds, var=var, source=str(path))
    return ds


# ---------------------------------------------------------------- generated


def simulate_dataset(
    system: str,
    steps: int,
    seed: int = 0,
    dt: float | None = None,
    spinup: int = 0,
    members: int = 1,
    substeps: int | None = None,
    params: dict[str, Any] | None = None,
    dtype: str = "float64",
    device: str | None = None,
) -> xr.Dataset:
    """Simulate ``system`` (``l63``, ``l96``, ``kolmogorov``) and return a CF dataset.

    Initial states ``random_state(members, Generator(seed))``, ``spinup`` discarded
    world steps, then ``steps`` states at model times ``0, dt, ..., (steps-1) dt``.
    Dims ``(time, *S)`` for one member, ``(time, member, *S)`` otherwise, with
    ``S`` = ``(component,)`` for l63, ``(x,)`` for l96, ``(y, x)`` for kolmogorov
    (coordinates in ``[0, 2π)``).
    """
    import torch

    from models.device import resolve_device
    from models.worlds.physical import physical_world

    if system not in SYSTEMS:
        raise InputError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    if steps < 1 or spinup < 0 or members < 1:
        raise InputError(
            f"need steps >= 1, spinup >= 0, members >= 1; got {steps}, {spinup}, {members}"
        )
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    kw: dict[str, Any] = dict(params or {})
    if dt is not None:
        kw["dt"] = dt
    if substeps is not None:
        kw["n_substeps"] = substeps
    try:
        world = physical_world(system, **kw)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    sim = world.simulator
    gen = torch.Generator().manual_seed(int(seed))
    x = sim.random_state(members, gen, dtype=getattr(torch, dtype), device=dev)
    for _ in range(spinup):
        x = world.step(x)
    out = torch.empty((steps, *x.shape), dtype=x.dtype, device=dev)
    out[0] = x
    for k in range(1, steps):
        x = world.step(x)
        out[k] = x
    arr = out.cpu().numpy()
    if not np.isfinite(arr).all():
        raise InputError(f"simulate {system}: the run blew up (non-finite values); reduce dt")
    var, dims, long_name = SYSTEMS[system]
    coords: dict[str, Any] = {}
    if system == "l63":
        coords["component"] = (np.arange(3), {"long_name": "Lorenz-63 variable (0: x, 1: y, 2: z)"})
    if system == "kolmogorov":
        c = 2 * np.pi * np.arange(sim.n) / sim.n
        coords["x"] = (c, {"long_name": "x on the periodic domain [0, 2 pi)"})
        coords["y"] = (c, {"long_name": "y on the periodic domain [0, 2 pi)"})
    times = world.dt * np.arange(steps)
    attrs = {
        "title": f"{long_name} simulated by assim",
        "source": f"models.physics {type(sim).__name__}",
        "assim_variable": var,
        "system": system,
        "params": json.dumps({k: v for k, v in vars(sim).items() if isinstance(v, int | float)}),
        "dt": world.dt,
        "substeps": world.n_substeps,
        "seed": int(seed),
        "spinup_steps": int(spinup),
    }
    build = io.trajectory_dataset if members == 1 else io.ensemble_dataset
    data = arr[:, 0] if members == 1 else arr
    return build(data, times, dims, name=var, long_name=long_name, coords=coords, attrs=attrs)


def _generated(entry: dict[str, Any], device: str | None) -> xr.Dataset:
    return simulate_dataset(
        entry["system"],
        steps=int(entry["steps"]),
        seed=int(entry.get("seed", 0)),
        dt=entry.get("dt"),
        spinup=int(entry.get("spinup", 0)),
        members=int(entry.get("members", 1)),
        substeps=entry.get("substeps"),
        params=entry.get("params"),
        dtype=entry.get("dtype", "float64"),
        device=device,
    )


# ------------------------------------------------------------------- real grids


def _from_package(name: str, entry: dict[str, Any]) -> xr.Dataset:
    pkg, resource = entry["package"], entry["resource"]
    try:
        ref = importlib.resources.files(pkg).joinpath(resource)
    except ModuleNotFoundError as exc:
        raise InputError(
            f"dataset {name!r} needs the Python package {pkg!r}: pip install -e .[data]"
        ) from exc
    if not ref.is_file():
        raise InputError(f"dataset {name!r}: {resource} not found in package {pkg!r}")
    with importlib.resources.as_file(ref) as src:
        coder = xr.coders.CFDatetimeCoder(use_cftime=True)
        with xr.open_dataset(src, decode_times=coder, decode_timedelta=False) as raw:
            if entry["variable"] not in raw.data_vars:
                raise InputError(f"{src}: variable {entry['variable']!r} not found")
            da = raw[entry["variable"]].load()
            t_enc = dict(raw["time"].encoding)
    return to_cf_grid(da, entry, t_enc, source=f"{pkg}:{resource}")


def to_cf_grid(
    da: xr.DataArray, entry: dict[str, Any], time_encoding: dict[str, Any], source: str
) -> xr.Dataset:
    """Convert a gridded ``DataArray`` to the common layout ``(time, lat, lon)``:
    latitude ascending, float32, NaN for missing, a ``mask`` variable (1 where the
    point is valid at some time, else 0), CF attributes, original calendar kept."""
    da = da.rename({k: v for k, v in (("latitude", "lat"), ("longitude", "lon")) if k in da.dims})
    extra = [d for d in da.dims if d not in ("time", "lat", "lon")]
    for d in extra:
        if da.sizes[d] != 1:
            raise InputError(f"{source}: cannot reduce dimension {d!r} of size {da.sizes[d]}")
    da = da.squeeze(extra).transpose("time", "lat", "lon").sortby("lat")
    values = da.values.astype(np.float32)
    mask = np.isfinite(values).any(axis=0).astype(np.int8)
    lat = (da["lat"].values.astype(np.float64), {})
    lon = (da["lon"].values.astype(np.float64), {})
    scalars = {d: da[d] for d in extra if d in da.coords}
    ds = io.trajectory_dataset(
        values,
        da["time"].values,
        ("lat", "lon"),
        name=entry["name"],
        units=entry.get("units", da.attrs.get("units", "1")),
        long_name=entry.get("long_name"),
        standard_name=entry.get("standard_name"),
        coords={"lat": lat, "lon": lon},
        attrs={
            "title": entry.get("description", ""),
            "source": source,
            "history": "converted by `assim datasets prepare`",
            "assim_variable": entry["name"],
        },
    )
    for d, c in scalars.items():
        ds = ds.assign_coords({d: ((), c.values.item(), dict(c.attrs))})
    ds["mask"] = xr.DataArray(
        mask,
        dims=("lat", "lon"),
        attrs={
            "long_name": "valid-point mask (1: valid at some time, 0: land or never observed)",
            "flag_values": np.array([0, 1], dtype=np.int8),
            "flag_meanings": "land_or_missing valid",
        },
    )
    calendar = time_encoding.get("calendar")
    if calendar is not None:  # keep the calendar; a zero-padded, unambiguous reference
        year = getattr(ds["time"].values[0], "year", None) or int(str(ds["time"].values[0])[:4])
        ds["time"].encoding.update(units=f"days since {year:04d}-01-01 00:00:00", calendar=calendar)
    return ds
