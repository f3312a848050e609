"""CF netCDF I/O: round trips, CF attributes, validation messages, atomic writes."""

from __future__ import annotations

import re

import cftime
import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from assim import io
from assim.errors import InputError


def _traj(nt: int = 6, nx: int = 5) -> xr.Dataset:
    x = np.arange(nt * nx, dtype=np.float64).reshape(nt, nx)
    return io.trajectory_dataset(x, 0.05 * np.arange(nt), ("x",), name="state", long_name="L96")


def test_trajectory_round_trip_with_cf_attributes(tmp_path, device):
    x = torch.linspace(-1, 1, 20, dtype=torch.float64, device=device).reshape(4, 5)
    ds = io.trajectory_dataset(x, [0.0, 0.05, 0.1, 0.15], ("x",), units="m", long_name="field")
    path = io.write_dataset(ds, tmp_path / "t.nc")
    back = io.read_dataset(path, var="state", dims=("time", "x"))
    np.testing.assert_array_equal(back["state"].values, x.cpu().numpy())
    np.testing.assert_allclose(back["model_time"].values, [0.0, 0.05, 0.1, 0.15])
    assert back.attrs["Conventions"] == "CF-1.8"
    assert back["state"].attrs == {"units": "m", "long_name": "field"}
    assert back["x"].attrs["axis"] == "X" and back["x"].attrs["units"] == "1"
    raw = netCDF4.Dataset(path)
    try:
        assert raw["time"].units == io.MODEL_TIME_UNITS.replace(" 00:00:00", "")
        assert raw["time"].calendar == "proleptic_gregorian"
        assert raw["time"].standard_name == "time" and raw["time"].axis == "T"
        assert "_FillValue" not in raw["x"].ncattrs()
    finally:
        raw.close()


def test_ensemble_member_is_a_cf_realization(tmp_path):
    a = np.random.default_rng(0).normal(size=(3, 4, 2, 2))
    ds = io.ensemble_dataset(a, np.arange(3.0), ("lat", "lon"), coords={"lat": [10.0, 20.0]})
    back = io.read_dataset(
        io.write_dataset(ds, tmp_path / "e.nc"), "state", ("time", "member", "lat", "lon")
    )
    assert back["member"].attrs["standard_name"] == "realization"
    assert back["lat"].attrs["units"] == "degrees_north" and back["lon"].attrs["axis"] == "X"
    np.testing.assert_array_equal(back["lat"].values, [10.0, 20.0])
    np.testing.assert_array_equal(back["state"].values, a)


def test_forecast_dataset_valid_time_is_reference_plus_lead(tmp_path):
    fc = np.random.default_rng(1).normal(size=(4, 3, 5))  # (members, leads, x)
    ref = np.datetime64("2026-11-26T00:00")
    lead = np.array([6, 12, 18], dtype="timedelta64[h]")
    ds = io.forecast_dataset(fc, ref, lead, ("x",))
    back = io.read_dataset(
        io.write_dataset(ds, tmp_path / "f.nc"), "state", ("time", "member", "x")
    )
    assert back["forecast_reference_time"].attrs["standard_name"] == "forecast_reference_time"
    assert back["forecast_period"].attrs["standard_name"] == "forecast_period"
    np.testing.assert_array_equal(back["time"].values, ref + lead)
    np.testing.assert_array_equal(back["forecast_period"].values, lead.astype("timedelta64[ns]"))
    np.testing.assert_array_equal(back["state"].values, np.moveaxis(fc, 0, 1))


def test_cftime_calendar_is_kept(tmp_path):
    times = np.array([cftime.Datetime360Day(2000, 2, d) for d in (28, 29, 30)])
    ds = io.trajectory_dataset(np.ones((3, 2)), times, ("x",), name="tas", units="K")
    back = io.read_dataset(io.write_dataset(ds, tmp_path / "c.nc"))
    assert back["time"].values[2] == cftime.Datetime360Day(2000, 2, 30)
    assert back["time"].encoding["calendar"] == "360_day"


# ------------------------------------------------------------------ validation


def test_missing_file(tmp_path):
    p = tmp_path / "nope.nc"
    with pytest.raises(InputError, match=re.escape(f"{p}: file not found")):
        io.read_dataset(p)


def test_choose_variable_picks_the_only_one_or_names_the_choices():
    ds = _traj()
    assert io.choose_variable(ds, "f.nc") == "state"
    assert io.choose_variable(ds, "f.nc", "state") == "state"
    with pytest.raises(InputError, match=re.escape("f.nc: variable 'sst' not found; available")):
        io.choose_variable(ds, "f.nc", "sst", hint="; pass --variable")
    two = ds.assign(other=ds["state"] * 2)
    with pytest.raises(InputError, match=re.escape("f.nc: several variables ['other', 'state']")):
        io.choose_variable(two, "f.nc")


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.nc"
    p.write_bytes(b"this is not netCDF" * 10)
    with pytest.raises(InputError, match=re.escape(f"{p}: cannot read as netCDF")):
        io.read_dataset(p)


def test_missing_variable(tmp_path):
    p = io.write_dataset(_traj(), tmp_path / "a.nc")
    with pytest.raises(
        InputError, match=re.escape(f"{p}: variable 'sst' not found; available: ['state']")
    ):
        io.read_dataset(p, var="sst")


def test_wrong_dims(tmp_path):
    p = io.write_dataset(_traj(), tmp_path / "a.nc")
    msg = f"{p}: variable 'state' has dims ('time', 'x'); expected ('time', 'lat', 'lon')"
    with pytest.raises(InputError, match=re.escape(msg)):
        io.read_dataset(p, var="state", dims=("time", "lat", "lon"))


def test_wrong_units(tmp_path):
    p = io.write_dataset(_traj(), tmp_path / "a.nc")
    with pytest.raises(
        InputError, match=re.escape(f"{p}: variable 'state' has units '1'; expected 'K'")
    ):
        io.read_dataset(p, var="state", units="K")
    io.read_dataset(p, var="state", units="1")


@pytest.mark.parametrize(
    "times,msg",
    [
        ([0.0, 0.1, 0.1, 0.3], "time has duplicated values"),
        ([0.0, 0.2, 0.1, 0.3], "time is not monotonic increasing (position 1"),
    ],
)
def test_bad_time_axis(tmp_path, times, msg):
    ds = io.trajectory_dataset(np.ones((4, 2)), times, ("x",))
    p = io.write_dataset(ds, tmp_path / "t.nc")
    with pytest.raises(InputError, match=re.escape(f"{p}: {msg}")):
        io.read_dataset(p)
    with pytest.raises(InputError, match=re.escape(f"memory: {msg}")):
        io.validate_dataset(ds, source="memory")


def test_all_nan_field(tmp_path):
    ds = io.trajectory_dataset(np.full((3, 2), np.nan), [0.0, 1.0, 2.0], ("x",), name="sst")
    p = io.write_dataset(ds, tmp_path / "n.nc")
    with pytest.raises(InputError, match=re.escape(f"{p}: variable 'sst' is all NaN")):
        io.read_dataset(p, var="sst")
    partly = ds.copy(deep=True)
    partly["sst"][0, 0] = 1.0
    io.validate_dataset(partly, "sst", ("time", "x"))  # some valid values: accepted


def test_array_shape_errors():
    with pytest.raises(
        InputError, match=r"state: expected an array \(time=3, x\), got shape \(2, 4\)"
    ):
        io.trajectory_dataset(np.ones((2, 4)), [0.0, 1.0, 2.0], ("x",))
    with pytest.raises(InputError, match=r"coordinate 'x': expected 4 values"):
        io.trajectory_dataset(np.ones((2, 4)), [0.0, 1.0], ("x",), coords={"x": [1, 2]})


# --------------------------------------------------------------- atomic writes


def _unwritable() -> xr.Dataset:
    ds = _traj()
    ds.attrs["bad"] = {"nested": "dicts cannot be netCDF attributes"}
    return ds


def test_failed_write_keeps_existing_file_and_leaves_no_temporary(tmp_path):
    p = io.write_dataset(_traj(), tmp_path / "keep.nc")
    before = p.read_bytes()
    with pytest.raises(InputError, match=re.escape(f"{p}: cannot write netCDF")):
        io.write_dataset(_unwritable(), p)
    assert p.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["keep.nc"]


def test_failed_write_mid_file_leaves_nothing(tmp_path, monkeypatch):
    # Simulate a crash after part of the file was written.
    def partial(self, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"CDF\x01partial")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", partial)
    p = tmp_path / "new.nc"
    with pytest.raises(InputError, match="disk full"):
        io.write_dataset(_traj(), p)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_content(tmp_path):
    p = io.write_dataset(_traj(nx=5), tmp_path / "o.nc")
    io.write_dataset(_traj(nx=3), p)
    assert io.read_dataset(p).sizes["x"] == 3


def test_builders_reject_unknown_keywords():
    with pytest.raises(TypeError, match="unit"):
        io.trajectory_dataset(np.ones((2, 3)), [0.0, 1.0], ("x",), unit="K")
