"""``assim assimilate --method dpf`` and ensemble methods with a learned world (the
shipped ``models/checkpoints/l96.pt``), end to end on a short Lorenz-96 run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr

from assim.cli import main
from assim.commands.assimilate import make_method
from assim.errors import InputError
from assim.filters.dpf_local import LocalDiffusionParticleFilter
from models.checkpoint import shipped

CYCLES = 12

pytestmark = pytest.mark.skipif("l96" not in shipped(), reason="no shipped l96 checkpoint")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli_dpf")
    truth, obs = d / "truth.nc", d / "obs.nc"
    assert (
        main(["simulate", "l96", "--steps", str(CYCLES + 1), "--seed", "2", "--out", str(truth)])
        == 0
    )
    args = ["observe", str(truth), "--operator", "identity", "--sigma", "1", "--seed", "5"]
    assert main([*args, "--out", str(obs)]) == 0
    yield d, truth, obs
    torch.set_num_threads(n_threads)


def _read(path):
    with xr.open_dataset(path) as ds:
        return ds.load()


def _assimilate(files, tmp_path, method, *extra, members=16, seed=4, name=None):
    d, truth, obs = files
    out = tmp_path / f"{name or method}.nc"
    args = ["assimilate", "--obs", str(obs), "--world", "l96", "--method", method]
    args += ["--members", str(members), "--truth", str(truth), "--init", "truth"]
    args += ["--init-std", "0.3", "--no-progress", "--seed", str(seed), "--out", str(out)]
    assert main([*args, *extra]) == 0
    return out


def test_local_dpf_writes_diagnostics_rank_histogram_and_tracks(files, tmp_path):
    opts = ["--radius", "3", "--q", "0.15", "--diffusion-steps", "2"]
    out = _assimilate(files, tmp_path, "dpf", *opts)
    a = _read(out)
    assert a.attrs["method"] == "dpf-local" and a.sizes["time"] == CYCLES
    for key in ("ess", "min_inner_ess", "inner_resamples", "mean_local_ess", "log_z"):
        v = a[key].values
        assert v.shape == (CYCLES,) and np.isfinite(v).all(), key
    assert ((a["ess"] >= 1) & (a["ess"] <= 16 + 1e-6)).all()
    assert ((a["min_inner_ess"] >= 1) & (a["min_inner_ess"] <= 16 + 1e-6)).all()
    # one rank per grid point and cycle; the stored p-value is the chi^2 test of them
    counts = a["rank_counts"].values
    assert counts.shape == (17,) and counts.sum() == CYCLES * 40
    p = scipy.stats.chisquare(counts).pvalue
    assert a.attrs["rank_histogram_pvalue"] == pytest.approx(p)
    assert (tmp_path / "dpf_rank.png").stat().st_size > 0
    # the learned world tracks: R = I, so the observations alone give rmse ~ 1; the
    # filter started at the truth (+0.3 noise) stays well below (study: 0.33)
    assert float(a["rmse"].mean()) < 0.7
    # same seed, same run (explicit generators); another seed differs
    again = _read(_assimilate(files, tmp_path, "dpf", *opts, "--plot", "none", name="again"))
    np.testing.assert_array_equal(again["mean"].values, a["mean"].values)
    other = _read(_assimilate(files, tmp_path, "dpf", *opts, "--plot", "none", seed=5, name="o"))
    assert not np.array_equal(other["mean"].values, a["mean"].values)


def test_global_dpf_log_evidence_and_ess_consistent(files, tmp_path):
    out = _assimilate(files, tmp_path, "dpf", "--q", "0.5", "--diffusion-steps", "2",
                      "--twist", "gaussian", "--threshold", "1.0", "--plot", "none")  # fmt: skip
    a = _read(out)
    assert a.attrs["method"] == "dpf"
    assert "mean_local_ess" not in a
    assert (a["resampled"].values == 1).all()  # --threshold 1: resample every cycle
    # log p(y | y_1:k-1) for 40 obs with R = I: between the noise floor -40 log(2 pi)/2 - 20
    # (perfect forecast) and far below (a lost filter gives < -200)
    lz = a["log_z"].values
    assert np.isfinite(lz).all() and (lz < -20 * math.log(2 * math.pi)).all() and (lz > -150).all()


@pytest.mark.parametrize("method", ["etkf", "letkf"])
def test_ensemble_kalman_filters_run_with_the_learned_world(files, tmp_path, method):
    extra = ["--diffusion-steps", "2", "--plot", "none", "--inflation", "1.02"]
    if method == "letkf":
        extra += ["--radius", "3"]
    a = _read(_assimilate(files, tmp_path, method, *extra, members=20))
    assert a.attrs["world_spec"] == "l96" and "min_inner_ess" not in a
    assert float(a["rmse"].mean()) < 0.5  # study: 0.19-0.20 (learned world, N = 40)


def test_bad_options_are_refused(files, tmp_path, capsys):
    d, truth, obs = files
    base = ["assimilate", "--obs", str(obs), "--members", "8", "--init", "truth"]
    base += ["--truth", str(truth), "--out", str(tmp_path / "x.nc"), "--no-progress"]
    bad = {
        "diffusion world": ["--world", "physical:l96", "--method", "dpf"],
        "--twist applies": ["--world", "physical:l96", "--method", "etkf", "--twist", "dps"],
        "need a learned": ["--world", "physical:l96", "--method", "etkf", "--q", "0.2"],
        "outside the schedule": ["--world", "l96", "--method", "dpf", "--q", "1e6"],
    }
    for message, extra in bad.items():
        assert main([*base, *extra]) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.nc").exists()
    with pytest.raises(InputError, match="does not take"):
        make_method("dpf", {"inflation": 1.1})
    assert isinstance(make_method("dpf", {"radius": 2.0}), LocalDiffusionParticleFilter)


def test_dpf_flags_reach_the_filter():
    """``--adapt-q`` / ``--reuse-denoised`` are parsed into the dpf's options; absent
    flags leave the filter's defaults."""
    import argparse

    from assim.commands.assimilate import add_arguments, method_options

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--obs", "o.nc", "--world", "l96", "--method", "dpf", "--members", "8"]
    base += ["--out", "a.nc", "--radius", "3"]
    on = method_options(p.parse_args([*base, "--adapt-q", "0.2", "--reuse-denoised"]))
    filt = make_method("dpf", on)
    assert filt.adapt_q == 0.2 and filt.reuse_denoised is True
    off = make_method("dpf", method_options(p.parse_args(base)))
    assert off.adapt_q == 0.0 and off.reuse_denoised is False
