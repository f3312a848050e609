"""Dataset catalogue: listing, preparation of real grids and generated sets, caching."""

from __future__ import annotations

import importlib.resources
import os
import re

import cftime
import netCDF4
import numpy as np
import pytest
import torch

from assim import datasets, io
from assim.errors import InputError
from models.worlds.physical import physical_world

REAL = ["ostia_sst", "e1_north_america", "a1b_north_america", "sst_anom", "hgt_djf"]
ALL = sorted(["l63", "l96", "kolmogorov64", *REAL])


def test_catalog_lists_every_dataset():
    listed = datasets.list_datasets()
    assert sorted(listed) == ALL
    assert all(len(desc) > 20 for desc in listed.values())


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(
        InputError, match=re.escape(f"unknown dataset 'era5'; known datasets: {', '.join(ALL)}")
    ):
        datasets.prepare("era5", tmp_path)


@pytest.mark.parametrize("name", REAL)
def test_real_grid_is_converted_to_the_common_layout(tmp_path, name):
    entry = datasets.read_catalog()[name]
    path = datasets.prepare(name, tmp_path)
    assert path == tmp_path / f"{name}.nc"
    ds = io.read_dataset(path, var=entry["name"], dims=("time", "lat", "lon"))
    assert ds["mask"].dims == ("lat", "lon") and ds["mask"].dtype == np.int8
    assert np.all(np.diff(ds["lat"].values) > 0)
    assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["axis"] == "X"
    assert ds[entry["name"]].attrs["units"] == entry["units"]
    # compare with the source file read independently through netCDF4
    src = importlib.resources.files(entry["package"]).joinpath(entry["resource"])
    with importlib.resources.as_file(src) as f, netCDF4.Dataset(f) as nc:
        raw = np.ma.filled(nc[entry["variable"]][:].astype(np.float64), np.nan).squeeze()
        calendar = nc["time"].calendar
        lat = nc["latitude"][:]
    if lat[0] > lat[-1]:
        raw = raw[:, ::-1]
    got = ds[entry["name"]].values
    np.testing.assert_allclose(got, raw, rtol=1e-6, equal_nan=True)
    land = ds["mask"].values == 0
    assert np.isnan(got[:, land]).all()
    assert np.isfinite(got[:, ~land]).any(axis=0).all()
    assert ds["time"].encoding["calendar"] == calendar


def test_360_day_calendar_is_kept_as_cftime(tmp_path):
    ds = io.read_dataset(datasets.prepare("e1_north_america", tmp_path), use_cftime=True)
    assert isinstance(ds["time"].values[0], cftime.Datetime360Day)
    assert ds.sizes["time"] == 240


def test_rerun_is_a_no_op(tmp_path, monkeypatch):
    path = datasets.prepare("sst_anom", tmp_path)
    stamp = os.stat(path).st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(datasets, "_from_package", boom)
    assert datasets.prepare("sst_anom", tmp_path) == path
    assert os.stat(path).st_mtime_ns == stamp


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASSIM_DATA_DIR", str(tmp_path / "cache"))
    assert datasets.prepare("sst_anom") == tmp_path / "cache" / "sst_anom.nc"
    monkeypatch.delenv("ASSIM_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and not __import__("sys").platform == "darwin":
        assert datasets.resolve_cache_dir() == tmp_path / "xdg" / "assim"


def _tiny_catalog(tmp_path, steps: int = 30):
    p = tmp_path / "catalog.toml"
    p.write_text(
        f"""
[tiny96]
kind = "generated"
description = "small L96"
system = "l96"
params = {{ n = 12, F = 8.0 }}
dt = 0.05
steps = {steps}
spinup = 10
seed = 3

[tinykol]
kind = "generated"
system = "kolmogorov"
params = {{ n = 16, re = 100.0 }}
dt = 0.1
substeps = 5
steps = 3
spinup = 2
seed = 1
members = 2
dtype = "float32"

[nopkg]
kind = "package"
package = "no_such_package_for_assim"
resource = "x.nc"
variable = "x"
name = "x"
"""
    )
    return p


def test_generated_set_equals_a_direct_simulation(tmp_path):
    cat = _tiny_catalog(tmp_path)
    ds = io.read_dataset(datasets.prepare("tiny96", tmp_path, catalog=cat), "state", ("time", "x"))
    world = physical_world("l96", n=12, F=8.0)
    x = world.simulator.random_state(1, torch.Generator().manual_seed(3), torch.float64)
    for _ in range(10):
        x = world.step(x)
    ref = [x]
    for _ in range(29):
        ref.append(world.step(ref[-1]))
    np.testing.assert_array_equal(ds["state"].values, torch.cat(ref).numpy())
    np.testing.assert_allclose(ds["model_time"].values, 0.05 * np.arange(30))
    assert ds.attrs["seed"] == 3 and ds.attrs["system"] == "l96"


def test_recipe_change_regenerates(tmp_path):
    datasets.prepare("tiny96", tmp_path, catalog=_tiny_catalog(tmp_path, steps=30))
    path = datasets.prepare("tiny96", tmp_path, catalog=_tiny_catalog(tmp_path, steps=40))
    assert io.read_dataset(path).sizes["time"] == 40


def test_generated_kolmogorov_ensemble_layout(tmp_path):
    cat = _tiny_catalog(tmp_path)
    path = datasets.prepare("tinykol", tmp_path, catalog=cat)
    ds = io.read_dataset(path, "vorticity", ("time", "member", "y", "x"))
    assert ds["vorticity"].dtype == np.float32 and ds.sizes["member"] == 2
    np.testing.assert_allclose(ds["x"].values, 2 * np.pi * np.arange(16) / 16)


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="needs the Python package 'no_such_package_for_assim'"):
        datasets.prepare("nopkg", tmp_path, catalog=_tiny_catalog(tmp_path))
