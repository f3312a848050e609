"""``assim simulate``, ``assim datasets``, ``assim demo`` and the plotting helpers."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from assim import plot
from assim.cli import main
from assim.errors import InputError

PNG = b"\x89PNG\r\n\x1a\n"


def test_simulate_l96_writes_a_cf_file(tmp_path, capsys):
    out = tmp_path / "truth.nc"
    assert main(["simulate", "l96", "--steps", "50", "--seed", "1", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with xr.open_dataset(out) as ds:
        assert ds["state"].dims == ("time", "x") and ds["state"].shape == (50, 40)
        assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["seed"] == 1
        assert ds["time"].attrs["standard_name"] == "time"
        np.testing.assert_allclose(ds["model_time"].values, 0.05 * np.arange(50))
        first = ds["state"].values
    # same seed -> same file content; another seed -> another trajectory
    out2 = tmp_path / "again.nc"
    main(["simulate", "l96", "--steps", "50", "--seed", "1", "--out", str(out2)])
    main(["simulate", "l96", "--steps", "50", "--seed", "2", "--out", str(tmp_path / "s2.nc")])
    with xr.open_dataset(out2) as a, xr.open_dataset(tmp_path / "s2.nc") as b:
        np.testing.assert_array_equal(a["state"].values, first)
        assert not np.allclose(b["state"].values, first)


@pytest.mark.parametrize(
    "argv,var,dims",
    [
        (["l63", "--steps", "7"], "state", ("time", "component")),
        (
            ["kolmogorov", "--steps", "3", "--spinup", "1", "--members", "2", "--float32"]
            + ["--param", "n=16", "--param", "re=500"],
            "vorticity",
            ("time", "member", "y", "x"),
        ),
    ],
)
def test_simulate_other_systems(tmp_path, argv, var, dims):
    out = tmp_path / "o.nc"
    assert main(["simulate", *argv, "--out", str(out), "--device", "cpu"]) == 0
    with xr.open_dataset(out) as ds:
        assert ds[var].dims == dims
        if "member" in dims:
            assert ds["member"].attrs["standard_name"] == "realization"


def test_simulate_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["simulate", "l63", "--steps", "0", "--out", str(tmp_path / "x.nc")]) == 2
    err = capsys.readouterr().err
    assert "assim simulate: error: need steps >= 1" in err
    assert not (tmp_path / "x.nc").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["simulate", "l63", "--steps", "2", "--out", str(blocker / "x.nc")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["simulate", "l96", "--steps", "2", "--param", "F", "--out", "y.nc"]) == 2
    assert "--param 'F': expected KEY=NUMBER" in capsys.readouterr().err
    assert main(["simulate", "l96", "--steps", "2", "--param", "G=1", "--out", "y.nc"]) == 2
    assert "bad simulator parameter" in capsys.readouterr().err


def test_datasets_list_and_prepare(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ASSIM_DATA_DIR", str(tmp_path))
    assert main(["datasets", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("l96", "kolmogorov64", "ostia_sst", "hgt_djf"):
        assert name in listed
    assert main(["datasets", "prepare", "sst_anom"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "sst_anom.nc")
    assert main(["datasets", "prepare", "nope"]) == 2
    assert "unknown dataset 'nope'; known datasets: a1b_north_america" in capsys.readouterr().err


def test_demo_writes_netcdf_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "40", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    nc, png = out / "l96_truth.nc", out / "l96_truth.png"
    assert f"wrote {nc}" in printed and f"wrote {png}" in printed
    assert png.read_bytes()[:8] == PNG
    with xr.open_dataset(nc) as ds:
        assert ds["state"].shape == (40, 40)
    # the nightly-cycle step: three consecutive cycle folders, each complete
    cycles = sorted(p.name for p in (out / "cycles").iterdir() if not p.name.startswith("."))
    assert [c for c in cycles if c[0].isdigit()] == ["20261124T00", "20261125T00", "20261126T00"]
    for c in ("20261124T00", "20261125T00", "20261126T00"):
        folder = out / "cycles" / c
        assert f"wrote {folder / 'analysis.nc'}" in printed
        assert (folder / "quicklook.png").read_bytes()[:8] == PNG
        assert (folder / "record.json").is_file()


# ------------------------------------------------------------------- plotting


def test_plots_are_png_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    h = plot.hovmoller(rng.normal(size=(30, 8)), tmp_path / "h.png", title="t")
    fields = rng.normal(size=(5, 6, 9))
    fields[0, :2] = np.nan  # land
    g = plot.field_grid(fields, tmp_path / "g.png", titles=list("abcde"), ncols=3)
    assert h.read_bytes()[:8] == PNG and g.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "h.png"]


def test_plot_input_errors(tmp_path):
    with pytest.raises(
        InputError, match=r"hovmoller: expected a \(time, x\) field, got shape \(3,\)"
    ):
        plot.hovmoller(np.ones(3), tmp_path / "h.png")
    with pytest.raises(InputError, match="field_grid: 2 fields but 1 titles"):
        plot.field_grid(np.ones((2, 3, 3)), tmp_path / "g.png", titles=["a"])
    assert list(tmp_path.iterdir()) == []
