"""Metrics against reference implementations (scoringrules, scipy) and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import scoringrules as sr
import torch
import xarray as xr

from assim import metrics as M
from assim.errors import InputError

F64 = torch.float64


def _ens(seed=0, n=11, shape=(7, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randn(
        *shape, generator=g, dtype=F64
    )


def test_crps_equals_scoringrules_fair(device):
    ens, y = _ens()
    ours = M.crps_ensemble(ens.to(device), y.to(device))
    ref = sr.crps_ensemble(
        y.numpy(), np.moveaxis(ens.numpy(), 0, -1), estimator="fair", backend="numpy"
    )
    np.testing.assert_allclose(ours.cpu().numpy(), ref, rtol=1e-12, atol=1e-12)
    # member_dim other than 0
    moved = M.crps_ensemble(ens.movedim(0, 1), y, member_dim=1)
    np.testing.assert_allclose(moved.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_crps_gaussian_limit():
    # fair CRPS of a large N(0,1) ensemble ~ closed-form Gaussian CRPS (Gneiting 2005);
    # MC s.e. of the mean of 400 elements ~ 0.01; tolerance 0.03.
    g = torch.Generator().manual_seed(1)
    ens = torch.randn(2000, 400, generator=g, dtype=F64)
    y = torch.full((400,), 0.7, dtype=F64)
    z = 0.7
    exact = (
        z * (2 * scipy.stats.norm.cdf(z) - 1) + 2 * scipy.stats.norm.pdf(z) - 1 / math.sqrt(math.pi)
    )
    assert float(M.crps_ensemble(ens, y).mean()) == pytest.approx(exact, abs=0.03)


def test_energy_score_equals_scoringrules_fair(device):
    ens, y = _ens(seed=2)  # event = last axis (5)
    ours = M.energy_score(ens.to(device), y.to(device))
    ref = sr.es_ensemble(
        y.numpy(), np.moveaxis(ens.numpy(), 0, -2), estimator="fair", backend="numpy"
    )
    np.testing.assert_allclose(ours.cpu().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_energy_score_one_dim_equals_crps():
    ens, y = _ens(seed=3, shape=(9,))
    es = M.energy_score(ens.unsqueeze(-1), y.unsqueeze(-1))
    torch.testing.assert_close(es, M.crps_ensemble(ens, y), rtol=1e-12, atol=1e-12)


def test_xarray_inputs_match_tensors():
    ens, y = _ens(seed=4, shape=(6, 4))
    da_e = xr.DataArray(ens.numpy(), dims=("member", "time", "x"))
    da_y = xr.DataArray(y.numpy(), dims=("time", "x"))
    crps = M.crps_ensemble(da_e, da_y, member_dim="member")
    assert crps.dims == ("time", "x")
    np.testing.assert_allclose(crps.values, M.crps_ensemble(ens, y).numpy(), rtol=1e-12)
    es = M.energy_score(da_e, da_y, member_dim="member", event_dims=["x"])
    assert es.dims == ("time",)
    np.testing.assert_allclose(es.values, M.energy_score(ens, y).numpy(), rtol=1e-12)
    assert M.spread_skill(da_e, da_y) == pytest.approx(M.spread_skill(ens, y), rel=1e-12)
    mean = da_e.mean("member")
    assert M.rmse_a(mean, da_y, burn_in=2) == pytest.approx(
        M.rmse_a(ens.mean(0), y, burn_in=2), rel=1e-12
    )
    assert float(M.rmse(mean, da_y)) == pytest.approx(float(M.rmse(ens.mean(0), y)), rel=1e-12)
    assert M.coverage(da_e, da_y, 0.8) == pytest.approx(M.coverage(ens, y, 0.8))


def test_rmse_a_is_time_mean_of_spatial_rms():
    mean = torch.zeros(4, 2, dtype=F64)
    truth = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [6.0, 8.0]], dtype=F64)
    # per-cycle RMS: sqrt(12.5), 0, 1, sqrt(50); burn_in 1 -> mean of the last three
    assert M.rmse_a(mean, truth, burn_in=1) == pytest.approx((0 + 1 + math.sqrt(50)) / 3)
    with pytest.raises(InputError):
        M.rmse_a(mean, truth, burn_in=4)


def test_spread_skill_is_one_for_calibrated_ensemble():
    # truth and members exchangeable draws: ratio -> 1; with 20000 elements its s.e. is
    # ~ sqrt(1/(2*20000)) relative, well under the 0.03 tolerance. An under-dispersive
    # ensemble (scale 0.5) gives ~0.5.
    g = torch.Generator().manual_seed(5)
    centre = 3 * torch.randn(20000, generator=g, dtype=F64)
    ens = centre + torch.randn(10, 20000, generator=g, dtype=F64)
    y = centre + torch.randn(20000, generator=g, dtype=F64)
    assert M.spread_skill(ens, y) == pytest.approx(1.0, abs=0.03)
    assert M.spread_skill(centre + 0.5 * (ens - centre), y) < 0.6


def test_rank_histogram_calibrated_vs_biased():
    g = torch.Generator().manual_seed(6)
    ens = torch.randn(9, 3000, generator=g, dtype=F64)
    y = torch.randn(3000, generator=g, dtype=F64)
    calibrated = M.rank_histogram(ens, y, generator=torch.Generator().manual_seed(0))
    biased = M.rank_histogram(ens, y + 0.5, generator=torch.Generator().manual_seed(0))
    assert calibrated.counts.sum() == 3000 and calibrated.counts.shape == (10,)
    assert calibrated.pvalue > 1e-3  # a fixed seed: fails with probability 1e-3 a priori
    assert biased.pvalue < 1e-10
    # ties (discrete data) are spread at random: all-equal members -> uniform ranks
    flat = M.rank_histogram(
        torch.zeros(4, 5000), torch.zeros(5000), generator=torch.Generator().manual_seed(1)
    )
    assert flat.pvalue > 1e-3


def test_coverage_of_exact_quantiles():
    g = torch.Generator().manual_seed(7)
    ens = torch.randn(400, 4000, generator=g, dtype=F64)
    y = torch.randn(4000, generator=g, dtype=F64)
    # binomial s.e. sqrt(0.9*0.1/4000) = 0.005 (+ quantile error of 400 members ~0.01)
    assert M.coverage(ens, y, 0.9) == pytest.approx(0.9, abs=0.03)
    assert M.coverage(ens, y + 3.0, 0.9) < 0.5


def test_auroc_equals_mann_whitney_and_pr_metrics():
    g = np.random.default_rng(8)
    lab = g.random(500) < 0.2
    s = np.round(g.normal(size=500) + 1.2 * lab, 1)  # rounded: many ties
    u = scipy.stats.mannwhitneyu(s[lab], s[~lab]).statistic
    assert M.auroc(torch.as_tensor(s), torch.as_tensor(lab)) == pytest.approx(
        u / (lab.sum() * (~lab).sum())
    )
    # brute force average precision and best F1 over distinct thresholds
    ths = np.unique(s)[::-1]
    prec = np.array([lab[s >= t].mean() for t in ths])
    rec = np.array([lab[s >= t].sum() / lab.sum() for t in ths])
    ap = np.sum(np.diff(np.r_[0, rec]) * prec)
    f1 = 2 * prec * rec / (prec + rec)
    assert M.auprc(s, lab) == pytest.approx(ap)
    best, thr = M.best_f1(s, lab)
    assert best == pytest.approx(f1.max()) and thr == pytest.approx(ths[np.argmax(f1)])
    assert M.auroc(-s + 0, lab) == pytest.approx(1 - u / (lab.sum() * (~lab).sum()))
    with pytest.raises(InputError):
        M.auroc(s, np.zeros(500, bool))


def test_ess_summary():
    out = M.ess_summary(torch.tensor([100.0, 50.0, 5.0, float("nan")]), n=100)
    assert out["min"] == 5.0 and out["median"] == 50.0
    assert out["frac_collapsed"] == pytest.approx(1 / 3)
