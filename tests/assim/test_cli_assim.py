"""``assim observe / assimilate / score`` end to end on a small Lorenz-96."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

from assim.cli import main
from assim.commands.observe import observation_from_attrs
from assim.commands.score import gaussian_crps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids contention
    d = tmp_path_factory.mktemp("cli")
    truth, obs = d / "truth.nc", d / "obs.nc"
    args = ["simulate", "l96", "--steps", "121", "--seed", "1", "--param", "n=12"]
    assert main([*args, "--out", str(truth)]) == 0
    args = ["observe", str(truth), "--operator", "every:2", "--sigma", "0.5", "--every", "2"]
    assert main([*args, "--seed", "3", "--missing", "0.1", "--out", str(obs)]) == 0
    yield d, truth, obs
    torch.set_num_threads(n_threads)


def _read(path):
    with xr.open_dataset(path) as ds:
        return ds.load()


def test_observe_records_what_rebuilds_the_observation(files):
    _, truth, obs = files
    o, t = _read(obs), _read(truth)
    assert o["y"].dims == ("time", "obs") and o["y"].shape == (60, 6)
    assert o.attrs["operator"] == "every:2" and o.attrs["sigma"] == 0.5
    np.testing.assert_array_equal(o["truth_index"].values, np.arange(2, 121, 2))
    np.testing.assert_array_equal(o["obs_x"].values, np.arange(0, 12, 2))
    # residuals y - h(truth) are the noise: N(0, 0.5^2); ~10 % NaN (unobserved).
    # sample std of ~324 draws has s.e. 0.5 / sqrt(2 * 324) ~ 0.02: allow 4 s.e.
    res = o["y"].values - t["state"].values[o["truth_index"].values][:, ::2]
    seen = ~np.isnan(res)
    assert 0.04 < 1 - seen.mean() < 0.18
    assert abs(res[seen].std() - 0.5) < 4 * 0.5 / math.sqrt(2 * seen.sum())
    observation = observation_from_attrs(o)
    y = torch.as_tensor(o["y"].values[0])
    x = torch.as_tensor(t["state"].values[2:3])
    want = observation.subset(~torch.isnan(y)).log_likelihood(y[~torch.isnan(y)], x)
    torch.testing.assert_close(observation.log_likelihood(y, x), want)


@pytest.mark.parametrize("method", ["etkf", "pf"])
def test_assimilate_and_score(files, method, capsys, tmp_path):
    d, truth, obs = files
    cfg = tmp_path / "method.toml"
    cfg.write_text("inflation = 1.05\n[pf]\nthreshold = 0.8\n")
    out = tmp_path / f"{method}.nc"
    extra = (
        ["--config", str(cfg)] if method == "etkf" else ["--threshold", "0.8", "--jitter", "0.3"]
    )
    members = "12" if method == "etkf" else "300"
    args = ["assimilate", "--obs", str(obs), "--world", "physical:l96", "--method", method]
    args += ["--members", members, "--truth", str(truth), "--init", "truth", "--init-std", "0.3"]
    args += ["--keep-ensemble", "--no-progress", "--seed", "4", "--out", str(out), *extra]
    if method == "pf":
        args += ["--model-noise", "0.3"]
    assert main(args) == 0
    a, t = _read(out), _read(truth)
    assert a.attrs["steps_per_cycle"] == 2 and a.attrs["members"] == int(members)
    if method == "etkf":
        assert "'inflation': 1.05" in a.attrs["method_params"]
    else:
        assert "'threshold': 0.8" in a.attrs["method_params"]
    np.testing.assert_allclose(a["model_time"].values, t["model_time"].values[2::2])
    tr = t["state"].values[2::2]
    rmse = np.sqrt(((a["mean"].values - tr) ** 2).mean(1))
    np.testing.assert_allclose(a["rmse"].values, rmse, rtol=1e-6)
    # the filter tracks the truth: far below the climatological error (~5 for L96)
    assert rmse[10:].mean() < 1.5
    capsys.readouterr()
    assert main(["score", str(out), "--truth", str(truth), "--burn-in", "10"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert float(printed["rmse.a"]) == pytest.approx(rmse[10:].mean(), rel=1e-5)
    assert float(printed["spread"]) == pytest.approx(a["spread"].values[10:].mean(), rel=1e-5)
    assert float(printed["cycles"]) == 50
    assert "crps" in printed and float(printed["crps"]) > 0


def test_gaussian_crps_matches_scoringrules():
    sr = pytest.importorskip("scoringrules")
    rng = np.random.default_rng(0)
    mu, sd, y = rng.normal(size=5), rng.uniform(0.2, 2, 5), rng.normal(size=5)
    np.testing.assert_allclose(gaussian_crps(mu, sd, y), sr.crps_normal(y, mu, sd), rtol=1e-10)


def test_cli_errors_are_clear(files, capsys, tmp_path):
    d, truth, obs = files
    bad = ["observe", str(truth), "--operator", "every:zz", "--sigma", "1"]
    assert main([*bad, "--out", str(tmp_path / "o.nc")]) == 2
    assert "every:zz" in capsys.readouterr().err
    args = ["assimilate", "--obs", str(truth), "--world", "physical:l96", "--method", "pf"]
    assert main([*args, "--members", "10", "--out", str(tmp_path / "a.nc")]) == 2
    assert "variable 'y' not found" in capsys.readouterr().err
    args = ["assimilate", "--obs", str(obs), "--world", "physical:l96", "--method", "kalman"]
    assert main([*args, "--members", "10", "--out", str(tmp_path / "a.nc")]) == 2
    assert "linear-Gaussian" in capsys.readouterr().err
    args = ["assimilate", "--obs", str(obs), "--world", "physical:l96", "--method", "pf"]
    assert main([*args, "--members", "10", "--radius", "3", "--out", str(tmp_path / "a.nc")]) == 2
    assert "radius" in capsys.readouterr().err
    assert not (tmp_path / "a.nc").exists()
