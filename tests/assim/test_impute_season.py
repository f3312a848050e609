"""Harmonic climatology (:mod:`assim.impute_clim`) and the fit options of the imputation
prior that choose the seasonal model and the temporal residual."""

from __future__ import annotations

import math

import pytest
import torch

from assim.baselines import grouped_climatology
from assim.errors import InputError
from assim.impute import fit_field_prior
from assim.impute_clim import harmonic_climatology
from assim.impute_hetero import loo_lag_corr


def test_full_harmonics_reproduce_the_monthly_means(gen) -> None:
    """H = G/2 spans every function of the month: on complete years (any NaN pattern
    leaving each month observed) the fit is the per-month mean, to round-off."""
    x = torch.randn(48, 5, generator=gen(0), dtype=torch.float64)
    x[3, 2] = x[17, 4] = float("nan")
    groups = torch.arange(48) % 12
    m_h, s_h = harmonic_climatology(x, groups, 12, 6)
    m_g, s_g = grouped_climatology(x, groups, 12)
    torch.testing.assert_close(m_h, m_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_h, s_g, rtol=1e-10, atol=1e-12)


def test_harmonic_fit_recovers_an_exact_annual_cycle(gen) -> None:
    """Values = 2 + 3 cos(2 pi g / 12 + 0.4) exactly: H = 1 recovers the cycle with any
    missing entries, and the anomaly std is ~0 (floored at 1e-6)."""
    groups = torch.arange(40) % 12
    cyc = 2 + 3 * torch.cos(2 * math.pi * torch.arange(12, dtype=torch.float64) / 12 + 0.4)
    x = cyc[groups][:, None].repeat(1, 3)
    x[torch.rand(x.shape, generator=gen(1), dtype=torch.float64) < 0.3] = float("nan")
    mean, std = harmonic_climatology(x, groups, 12, 1)
    torch.testing.assert_close(mean, cyc[:, None].expand(12, 3), rtol=0, atol=1e-10)
    assert float(std.max()) < 1e-6 + 1e-9
    with pytest.raises(InputError, match="harmonics"):
        harmonic_climatology(x, groups, 12, 7)


def test_fit_field_prior_uses_the_harmonic_climatology(gen) -> None:
    lat = torch.linspace(-10.0, 10.0, 3, dtype=torch.float64).repeat_interleave(4)
    lon = torch.linspace(100.0, 130.0, 4, dtype=torch.float64).repeat(3)
    groups = torch.arange(36) % 12
    x = torch.randn(36, 12, generator=gen(2), dtype=torch.float64)
    pr = fit_field_prior(x, groups, lat, lon, 12, rank=0, seasonal=2, calibrate=False)
    ref, _ = harmonic_climatology(x, groups, 12, 2)
    torch.testing.assert_close(pr.clim_mean, ref)
    pr0 = fit_field_prior(x, groups, lat, lon, 12, rank=0, calibrate=False, hetero=False)
    torch.testing.assert_close(pr0.clim_mean, grouped_climatology(x, groups, 12)[0])


def test_loo_lag_corr_of_an_ar1_in_time_field(gen) -> None:
    """White-in-space fields (corr = I: the LOO residual is the value itself) following
    AR(1) with rho = 0.5 in time: the estimate's sd is ~sqrt((1 - rho^2) / (T P)) =
    0.006 at T P = 20000, tolerance 0.03 (5 sd). With a correlated kernel the LOO
    residual of an AR(1)-in-time Gaussian field is AR(1) with the same rho (a fixed
    linear map applied at every step)."""
    g = gen(3)
    t, p = 400, 50
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    corr = a @ a.T / p + 0.5 * torch.eye(p, dtype=torch.float64)
    lc = torch.linalg.cholesky(corr)
    eps = torch.randn(t, p, generator=g, dtype=torch.float64)
    x = torch.empty(t, p, dtype=torch.float64)
    x[0] = eps[0]
    for k in range(1, t):
        x[k] = 0.5 * x[k - 1] + math.sqrt(1 - 0.25) * eps[k]
    assert loo_lag_corr(x, torch.eye(p, dtype=torch.float64)) == pytest.approx(0.5, abs=0.03)
    assert loo_lag_corr(x @ lc.T, corr) == pytest.approx(0.5, abs=0.03)
    neg = x.clone()
    neg[1::2] *= -1  # lag-1 correlation -0.5: clamped to 0
    assert loo_lag_corr(neg, torch.eye(p, dtype=torch.float64)) == 0.0


def test_temporal_residual_option_values(gen) -> None:
    lat = torch.linspace(-10.0, 10.0, 3, dtype=torch.float64).repeat_interleave(4)
    lon = torch.linspace(100.0, 130.0, 4, dtype=torch.float64).repeat(3)
    x = torch.randn(30, 12, generator=gen(4), dtype=torch.float64)
    grp = torch.zeros(30, dtype=torch.long)
    kw = dict(rank=0, calibrate=False, hetero=False)
    assert fit_field_prior(x, grp, lat, lon, 1, temporal_residual=0.4, **kw).resid_rho == 0.4
    assert fit_field_prior(x, grp, lat, lon, 1, temporal_residual=False, **kw).resid_rho == 0.0
    with pytest.raises(InputError, match="temporal_residual"):
        fit_field_prior(x, grp, lat, lon, 1, temporal_residual=1.5, **kw)


def test_temporal_residual_loo_is_the_lag_corr_of_the_loo_residuals(gen) -> None:
    """rank 0: the residual is the standardised field itself, and the LOO residuals do
    not depend on the kernel's scale, so resid_rho equals loo_lag_corr under the
    fitted kernel exactly; on AR(1)-in-time fields (rho 0.6) it is near 0.6 (sd
    ~sqrt(1 / (T P)) ~ 0.01, tolerance 0.08 covers the standardisation)."""
    lat = torch.linspace(-10.0, 10.0, 4, dtype=torch.float64).repeat_interleave(5)
    lon = torch.linspace(100.0, 140.0, 5, dtype=torch.float64).repeat(4)
    g = gen(8)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64)
    for k in range(1, 200):
        x[k] = 0.6 * x[k - 1] + 0.8 * x[k]
    grp = torch.zeros(200, dtype=torch.long)
    pr = fit_field_prior(x, grp, lat, lon, 1, rank=0, calibrate=False, temporal_residual="loo")
    z = pr.standardize(x, grp)
    assert pr.resid_rho == pytest.approx(loo_lag_corr(z, pr.residual.cov()), rel=1e-10)
    assert pr.resid_rho == pytest.approx(0.6, abs=0.08)


def test_std_power_divides_by_a_partial_standard_deviation(gen) -> None:
    """std_power p: the prior's scale is s^p mean(s)^(1-p) of the pooled anomaly sd s
    (p = 1 the default, p = 0 one common scale); outside [0, 1] is an error."""
    from assim.baselines import grouped_climatology

    lat = torch.linspace(-10.0, 10.0, 3, dtype=torch.float64).repeat_interleave(4)
    lon = torch.linspace(100.0, 130.0, 4, dtype=torch.float64).repeat(3)
    amp = torch.linspace(0.5, 3.0, 12, dtype=torch.float64)
    x = torch.randn(30, 12, generator=gen(6), dtype=torch.float64) * amp
    grp = torch.zeros(30, dtype=torch.long)
    kw = dict(rank=0, calibrate=False, temporal_residual=False)
    _, s = grouped_climatology(x, grp, 1)
    for p in (1.0, 0.5, 0.0):
        pr = fit_field_prior(x, grp, lat, lon, 1, std_power=p, **kw)
        assert torch.allclose(pr.clim_std, s**p * s.mean() ** (1 - p), rtol=1e-12)
    with pytest.raises(InputError, match="std_power"):
        fit_field_prior(x, grp, lat, lon, 1, std_power=1.5, **kw)


def test_holdout_std_power_picks_full_standardisation_for_a_scaled_field(gen) -> None:
    """Fields a_i f_i with f a stationary smooth field and a per-point amplitude a
    spanning 0.2-5 (a sharp step across the grid): only full standardisation (p = 1)
    makes them stationary, so it has the lowest held-out CRPS; the fitted prior uses it."""
    from assim.baselines import grouped_climatology
    from assim.impute_prior import TorusMatern
    from assim.impute_select import select_std_power

    n = 6
    c = torch.arange(n, dtype=torch.float64) * 2.0
    la, lo = (v.flatten() for v in torch.meshgrid(c - 5.0, 100.0 + c, indexing="ij"))
    oi = TorusMatern(la * 0.1, lo * 0.1, 0.8, 0.02, 1.0)
    chol = torch.linalg.cholesky(oi.cov())
    f = torch.randn(60, n * n, generator=gen(9), dtype=torch.float64) @ chol.T
    amp = torch.where(lo < 106.0, 0.2, 5.0)
    x = f * amp
    grp = torch.zeros(60, dtype=torch.long)
    kw = dict(rank=0, temporal_residual=False)
    p, crps = select_std_power(x, grp, la, lo, 1, generator=gen(10), **kw)
    assert set(crps) == {1.0, 0.5, 0.0} and crps[p] == min(crps.values())
    assert p == 1.0 and crps[0.0] > 1.2 * crps[1.0]
    pr = fit_field_prior(x, grp, la, lo, 1, std_power="holdout", generator=gen(10), **kw)
    assert torch.allclose(pr.clim_std, grouped_climatology(x, grp, 1)[1], rtol=1e-12)


def test_holdout_std_power_skips_the_refits_for_a_uniform_sd(gen) -> None:
    """A pooled sd that varies by less than 20 % (coefficient of variation): p = 1
    without refits (empty scores), and the prior equals the p = 1 fit."""
    from assim.impute_select import select_std_power

    lat = torch.linspace(-10.0, 10.0, 3, dtype=torch.float64).repeat_interleave(4)
    lon = torch.linspace(100.0, 130.0, 4, dtype=torch.float64).repeat(3)
    x = torch.randn(40, 12, generator=gen(11), dtype=torch.float64)
    grp = torch.zeros(40, dtype=torch.long)
    kw = dict(rank=0, calibrate=False, temporal_residual=False)
    assert select_std_power(x, grp, lat, lon, 1, **kw) == (1.0, {})
    a = fit_field_prior(x, grp, lat, lon, 1, std_power="holdout", **kw)
    b = fit_field_prior(x, grp, lat, lon, 1, std_power=1.0, **kw)
    assert torch.equal(a.clim_std, b.clim_std) and a.scale == b.scale
