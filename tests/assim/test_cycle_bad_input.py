"""Bad observation files: the cycle exits 65 (EX_DATAERR) with a message naming the
file and the problem, writes nothing, and leaves earlier cycles byte-identical."""

from __future__ import annotations

import shutil
from datetime import timedelta

import numpy as np
import pytest
import xarray as xr

from assim.cli import main
from assim.cycle import catch_up
from assim.cycle_demo import write_observation_file
from tests.assim.test_cycle_helpers import T0, fill_inbox, tree_hashes, write_config

DAY = timedelta(days=1)
T2 = T0 + 2 * DAY
STEPS = [T2 - timedelta(hours=12), T2]  # the two step times in (T1, T2]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Two complete cycles and a good observation file for the third."""
    root = tmp_path_factory.mktemp("bad_input")
    _, cfg = write_config(root)
    fill_inbox(cfg, 3)
    catch_up(cfg, T0 + DAY)
    return root


def _good(root):
    with xr.open_dataset(root / "inbox" / "obs_20261103T00.nc") as ds:
        return ds.load()


def _write(path, ds):
    path.unlink()
    ds.to_netcdf(path, engine="netcdf4")


def corrupt(path, ds):
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)


def truncated(path, ds):
    path.write_bytes(path.read_bytes()[:600])


def wrong_variable(path, ds):
    _write(path, ds.rename({"x": "temperature"}))


def wrong_units(path, ds):
    ds["x"].attrs["units"] = "K"
    _write(path, ds)


def wrong_dims(path, ds):
    write_observation_file(path, STEPS, ds["x"].values[:, :39], "x", "1")


def transposed(path, ds):
    _write(path, ds.transpose("obs", "time"))


def all_nan(path, ds):
    write_observation_file(path, STEPS, np.full((2, 40), np.nan), "x", "1")


def duplicated_times(path, ds):
    write_observation_file(path, [T2, T2], ds["x"].values, "x", "1")


def out_of_window(path, ds):
    write_observation_file(path, [T2 - DAY, T2], ds["x"].values, "x", "1")


def off_step_grid(path, ds):
    write_observation_file(path, [T2 - timedelta(hours=5), T2], ds["x"].values, "x", "1")


CASES = {
    corrupt: "cannot read observation file",
    truncated: "cannot read observation file",
    wrong_variable: "variable 'x' not found (file has: temperature)",
    wrong_units: "has units 'K', expected '1'",
    wrong_dims: "expected (time, ...) with 40 values per time",
    transposed: "has dims {'obs': 40, 'time': 2}",
    all_nan: "is all NaN",
    duplicated_times: "duplicated observation times: 2026-11-03T00:00",
    out_of_window: (
        "2026-11-02T00:00 is outside the cycle window (2026-11-02T00:00, 2026-11-03T00:00]"
    ),
    off_step_grid: "not on the model step grid",
}


@pytest.mark.parametrize("spoil", list(CASES), ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["cycle", "catch-up"])
def test_bad_observation_file_fails_cleanly(template, tmp_path, capsys, spoil, mode):
    root = tmp_path / "run"
    shutil.copytree(template, root)
    path, cfg = write_config(root)
    obs = cfg.observations.path(T2)
    spoil(obs, _good(root))
    before = tree_hashes(cfg.output)
    args = (
        ["--cycle", "2026-11-03T00"]
        if mode == "cycle"
        else ["--catch-up", "--until", "2026-11-03T00"]
    )
    rc = main(["cycle", "--config", str(path), *args])
    err = capsys.readouterr().err
    assert rc == 65
    assert str(obs) in err and CASES[spoil] in err, err
    assert tree_hashes(cfg.output) == before
    assert sorted(p.name for p in cfg.output.iterdir()) == [
        ".lock",
        "20261101T00",
        "20261102T00",
        "cycle.log",
    ]
    assert CASES[spoil] in (cfg.output / "cycle.log").read_text()


def test_good_file_of_the_template_passes(template, tmp_path):
    """The spoiled files above differ from a good one only by the stated defect."""
    root = tmp_path / "run"
    shutil.copytree(template, root)
    path, cfg = write_config(root)
    assert main(["cycle", "--config", str(path), "--cycle", "2026-11-03T00"]) == 0
    assert (cfg.output / "20261103T00" / "record.json").exists()


def test_bad_restart_is_a_data_error(template, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(template, root)
    path, cfg = write_config(root, members=12)  # the restarts hold 10 members
    rc = main(["cycle", "--config", str(path), "--cycle", "2026-11-03T00"])
    err = capsys.readouterr().err
    assert rc == 65 and "20261102T00/restart.nc" in err and "(12, 40)" in err


def test_missing_restart_without_cold_start_exits_66(template, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(template, root)
    path, cfg = write_config(root, cold_start={"enabled": False})
    rc = main(["cycle", "--config", str(path), "--cycle", "2026-11-05T00"])
    assert rc == 66 and "20261104T00/restart.nc is missing" in capsys.readouterr().err
