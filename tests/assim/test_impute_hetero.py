"""Non-stationary residual of the imputation prior (:mod:`assim.impute_hetero`): the LOO
identities against brute-force Gaussian conditioning, recovery of a known variance
field, no spurious non-stationarity on stationary data, and its use in FieldPrior."""

from __future__ import annotations

import math

import pytest
import torch

from assim.baselines import MaternOI
from assim.impute import FieldPrior, fit_field_prior
from assim.impute_hetero import loo_lpd, loo_variance_ratio, residual_sd, smooth_log
from assim.impute_prior import _smoother
from assim.smoother import gaussian_conditional


def _grid(nlat: int = 8, nlon: int = 10):
    lat = torch.linspace(-20.0, 20.0, nlat, dtype=torch.float64)
    lon = torch.linspace(100.0, 190.0, nlon, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return la.flatten(), lo.flatten()


def _spd(p: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    return (a @ a.T / p + 0.3 * torch.eye(p, dtype=torch.float64)).to(device)


def test_loo_identities_are_the_gaussian_conditional(device, gen) -> None:
    """r_p = (Q z)_p / Q_pp and v_p = 1 / Q_pp are z_p - E[z_p | z_-p] and
    Var[z_p | z_-p] (R&W eq. 5.12): checked against explicit conditioning, to round-off."""
    p, t = 7, 5
    cov = _spd(p, 3, device)
    z = torch.randn(t, p, generator=gen(1, device), device=device, dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    ratio, lpd = torch.zeros(p, dtype=torch.float64, device=device), 0.0
    for k in range(t):
        for i in range(p):
            x = z[k].clone()
            x[i] = float("nan")
            m, c = gaussian_conditional(torch.zeros_like(x), cov, x)
            r, v = z[k, i] - m[i], c[i, i]
            ratio[i] += r**2 / v / t
            lpd += float(-0.5 * (r**2 / (2.5 * v) + torch.log(2 * math.pi * 2.5 * v))) / (t * p)
    torch.testing.assert_close(loo_variance_ratio(z, prec), ratio, rtol=1e-9, atol=1e-12)
    assert loo_lpd(z, prec, 2.5) == pytest.approx(lpd, rel=1e-9)


def test_smooth_log_is_a_weighted_geometric_mean() -> None:
    g = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(smooth_log(g, w), torch.tensor([2.0, 4.0, 4.0]).double())


def _samples(sd: torch.Tensor, corr: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(t, sd.numel(), generator=g, dtype=torch.float64)
    return (eps @ torch.linalg.cholesky(corr).T) * sd


def _setup():
    la, lo = _grid()
    oi = MaternOI(la, lo, 900.0, 0.05, 1.0)
    smoothers = [lambda b=b: _smoother(oi, b) for b in (300.0, 600.0, 1200.0)]
    return la, lo, oi, oi.cov(), smoothers


def test_residual_sd_recovers_a_known_smooth_variance_field() -> None:
    """Fields from diag(s0) C diag(s0) with s0 varying 7x smoothly across the grid and
    a scale of 0.3: the held-out score picks a non-stationary candidate, log s
    correlates with log s0, and the fitted ``scale s^2`` is within 35 % of ``0.3 s0^2``
    everywhere (the smoothed LOO ratio is a biased, smoothed estimate of s0^2: the
    bound is loose on purpose, the stationary answer misses it by a factor ~7)."""
    la, lo, _, corr, smoothers = _setup()
    s0 = torch.exp(lo.sub(145.0).div(45.0))  # e^-1 .. e^1 from west to east
    z = _samples(s0 * math.sqrt(0.3), corr, 400, 0)
    sd, scale, j = residual_sd(z, corr, smoothers, 300)
    assert j >= 0 and sd is not None
    assert float(torch.corrcoef(torch.stack([sd.log(), s0.log()]))[0, 1]) > 0.95
    ratio = scale * sd**2 / (0.3 * s0**2)
    assert float(ratio.min()) > 0.65 and float(ratio.max()) < 1.35


def test_residual_sd_stays_near_stationary_on_stationary_data() -> None:
    """Stationary fields (s0 = 1, scale 0.5), T = 400: either the stationary residual
    wins or s stays within [0.8, 1.25] of its median (the per-point LOO ratio of 300
    fields has relative sd ~sqrt(2 / 300) = 0.08 before smoothing, 0.04 in s), and the
    scale is 0.5 within 10 % (its sd: ~sqrt(2 / (400 * 80)) ~ 1 %)."""
    _, _, _, corr, smoothers = _setup()
    z = _samples(torch.full((corr.shape[0],), math.sqrt(0.5), dtype=torch.float64), corr, 400, 1)
    sd, scale, j = residual_sd(z, corr, smoothers, 300)
    if sd is not None:
        assert float(sd.min()) > 0.8 and float(sd.max()) < 1.25
    assert scale == pytest.approx(0.5, rel=0.1)


def test_field_prior_with_resid_sd_is_the_scaled_covariance_and_round_trips() -> None:
    la, lo = _grid(4, 5)
    p = la.numel()
    e, z0 = torch.zeros(p, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    ones = torch.ones(p, dtype=torch.float64)
    base = FieldPrior(la, lo, ones[None] * 0, ones, e, z0, z0, 900.0, 0.05, 0.7)
    same = FieldPrior(la, lo, ones[None] * 0, ones, e, z0, z0, 900.0, 0.05, 0.7, resid_sd=ones)
    assert torch.equal(base.window.resid_cov, same.window.resid_cov)
    s = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    het = FieldPrior(la, lo, ones[None] * 0, ones, e, z0, z0, 900.0, 0.05, 0.7, resid_sd=s)
    ref = s[:, None] * base.window.resid_cov * s[None, :]
    torch.testing.assert_close(het.window.resid_cov, ref, rtol=1e-12, atol=0)
    back = FieldPrior.from_state_dict(het.state_dict())
    torch.testing.assert_close(back.resid_sd, s, rtol=1e-6, atol=0)  # stored as float32
    assert FieldPrior.from_state_dict(base.state_dict()).resid_sd is None


def test_fit_field_prior_finds_the_heteroscedastic_residual() -> None:
    """Fields = a uniform common mode N(0, 9) at every point + a residual from
    diag(s0) C diag(s0): after standardisation by the per-point std the residual's sd is
    ``s0 / sqrt(9 + s0^2)`` (a 5x contrast). fit_field_prior(rank=1) with hetero=True
    returns s correlated with it and a better held-out LOO log density of the residual
    than hetero=False."""
    la, lo, _, corr, _ = _setup()
    p = la.numel()
    s0 = torch.exp(lo.sub(145.0).div(45.0))
    g = torch.Generator().manual_seed(2)
    common = 3.0 * torch.randn(160, 1, generator=g, dtype=torch.float64)
    x = common + _samples(s0, corr, 160, 2)
    groups = torch.zeros(160, dtype=torch.long)
    het = fit_field_prior(x[:120], groups[:120], la, lo, 1, rank=1, spread="fixed", hetero=True)
    sta = fit_field_prior(x[:120], groups[:120], la, lo, 1, rank=1, spread="fixed", hetero=False)
    assert sta.resid_sd is None and het.resid_sd is not None
    target = (s0 / (9 + s0**2).sqrt()).log()
    assert float(torch.corrcoef(torch.stack([het.resid_sd.log(), target]))[0, 1]) > 0.9

    def heldout(pr: FieldPrior) -> float:
        zz = pr.standardize(x[120:], groups[120:])
        zz = zz - zz @ pr.basis @ pr.basis.T
        return loo_lpd(zz, torch.linalg.inv(pr.window.resid_cov))

    assert p == 80 and heldout(het) > heldout(sta) + 0.1


def test_spread_sd_scales_the_deviations_and_keeps_the_mean(gen) -> None:
    """Same generator: samples with spread_sd are mean + (samples - mean) * spread_sd
    of the prior without it, exactly; the mean is identical."""
    la, lo = _grid(4, 5)
    p = la.numel()
    e, z0 = torch.zeros(p, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    ones = torch.ones(p, dtype=torch.float64)
    f = torch.linspace(0.3, 3.0, p, dtype=torch.float64)
    args = (la, lo, ones[None] * 0, ones, e, z0, z0, 900.0, 0.05, 0.7)
    z = torch.randn(3, p, generator=gen(5), dtype=torch.float64)
    z[torch.rand(3, p, generator=gen(6), dtype=torch.float64) < 0.5] = float("nan")
    for spread in ("fixed", "local"):
        base = FieldPrior(*args, spread=spread)
        scaled = FieldPrior(*args, spread=spread, spread_sd=f)
        s0, m0 = base.posterior(z, 8, gen(7))
        s1, m1 = scaled.posterior(z, 8, gen(7))
        assert torch.equal(m0, m1)
        torch.testing.assert_close(s1, m0 + (s0 - m0) * f, rtol=1e-12, atol=1e-12)
    back = FieldPrior.from_state_dict(scaled.state_dict())
    torch.testing.assert_close(back.spread_sd, f, rtol=1e-6, atol=0)


def test_holdout_errors_sum_to_the_global_ratio(gen) -> None:
    """The per-point sums of holdout_errors are the numerator and denominator of
    holdout_variance_ratio (same generator: same masks and draws)."""
    from assim.impute_prior import holdout_errors, holdout_variance_ratio

    la, lo = _grid(4, 5)
    p = la.numel()
    e, z0 = torch.zeros(p, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    ones = torch.ones(p, dtype=torch.float64)
    pr = FieldPrior(la, lo, ones[None] * 0, ones, e, z0, z0, 900.0, 0.05, 0.7)
    z = pr.window.sample(1, 30, gen(9))[0] * 1.5
    err2, var = holdout_errors(pr, z, 20, gen(10))
    c = holdout_variance_ratio(pr, z, 20, gen(10))
    assert c == pytest.approx(float(err2.sum() / var.sum()), rel=1e-10)
    assert err2.shape == (p,) and bool((var > 0).any())


def test_spread_hetero_widens_where_the_fit_fields_vary_more() -> None:
    """Residual amplitude 1 in the west half and 2 in the east half, after a uniform
    common mode: the per-point spread factors (calibrated on held-out fields) are
    larger in the east than in the west on average, and the mean is untouched."""
    la, lo, _, corr, _ = _setup()
    amp = torch.where(lo > 145.0, 2.0, 1.0).double()
    g = torch.Generator().manual_seed(11)
    x = 3.0 * torch.randn(120, 1, generator=g, dtype=torch.float64) + _samples(amp, corr, 120, 3)
    grp = torch.zeros(120, dtype=torch.long)
    kw = dict(rank=1, spread="fixed")
    pr = fit_field_prior(x, grp, la, lo, 1, spread_hetero=True, **kw)
    assert pr.spread_sd is not None
    east, west = pr.spread_sd[lo > 145.0].mean(), pr.spread_sd[lo < 145.0].mean()
    assert float(east) > 1.1 * float(west)
