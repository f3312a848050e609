"""Spread models and calibration of the imputation prior: the scale-mixture posterior,
the held-out variance factor, the Gamma sampler, the torus geometry and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats

from assim.impute import grid_geometry
from assim.impute_prior import FieldPrior, TorusMatern, fit_residual, holdout_variance_ratio
from assim.smoother import GaussianWindowPrior, _gamma, gaussian_conditional


def _window(p: int = 8, r: int = 2, seed: int = 0, device="cpu") -> GaussianWindowPrior:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    k = a @ a.T / p + 0.2 * torch.eye(p, dtype=torch.float64)
    lam = torch.tensor([2.0, 1.0], dtype=torch.float64)[:r]
    rho = torch.tensor([0.8, 0.3], dtype=torch.float64)[:r]
    return GaussianWindowPrior(u, lam, rho, k).to(device)


def _grid_prior(scale_true: float = 1.0, nugget: float = 0.05) -> FieldPrior:
    """A rank-0 FieldPrior (pure Matérn residual) on a 6 x 8 lat-lon grid."""
    lat = torch.linspace(-20.0, 20.0, 6, dtype=torch.float64)
    lon = torch.linspace(100.0, 170.0, 8, dtype=torch.float64)
    la, lo = (t.flatten() for t in torch.meshgrid(lat, lon, indexing="ij"))
    p = la.numel()
    e = torch.zeros(p, 0, dtype=torch.float64)
    z0 = torch.zeros(0, dtype=torch.float64)
    ones = torch.ones(p, dtype=torch.float64)
    return FieldPrior(la, lo, ones[None] * 0, ones, e, z0, z0, 1500.0, nugget, scale_true)


def test_gamma_sampler_matches_scipy(gen) -> None:
    # KS test at n = 20000 draws: a correct sampler fails with probability 1e-3
    for shape in (0.3, 2.5, 400.0):
        x = _gamma(shape, 20000, gen(int(shape * 10))).numpy()
        assert stats.kstest(x, stats.gamma(shape).cdf).pvalue > 1e-3


def test_window_scale_posterior_is_the_scale_mixture(device, gen) -> None:
    """Data drawn from N(0, c Sigma) with c = 4: the window scale's posterior mean is
    q / n_O within its own sd, the mean is the exact conditional mean (s2-free), and
    the samples' covariance is E[s2 | y] Sigma_M|O."""
    pr = _window(device=device)
    g = gen(1, device)
    c_true = 4.0
    x = pr.sample(1, 40, g)[0] * math.sqrt(c_true)  # (40, 8): n_O ~ 200 observed entries
    hid = torch.rand(x.shape, generator=g, device=device) < 0.4
    z = x.masked_fill(hid, float("nan"))
    n = 4000
    smp, mean = pr.posterior_scaled(z, n, g, "window", dof=1.0)
    _, ref_mean = pr.posterior(z, 2, g)
    assert torch.allclose(mean, ref_mean, atol=1e-10, rtol=0)
    q, n_obs = pr.mahalanobis(z)
    # q / n_O estimates c with sd c sqrt(2 / n_O) ~ 0.4: 4 sd around the truth
    assert abs(q / n_obs - c_true) < 4 * c_true * math.sqrt(2 / n_obs)
    # E[s2 | y] = (1 + q) / (1 + n_O - 2) for InvGamma((1 + n_O)/2, (1 + q)/2)
    e_s2 = (1 + q) / (n_obs - 1)
    # one hidden entry: Var = E[s2 | y] Sigma_ii|O (exact conditional over the window)
    big = z.flatten().cpu()
    m_ref, c_ref = gaussian_conditional(torch.zeros_like(big), _dense_window_cov(pr, 40).cpu(), big)
    i = int(hid.flatten().cpu().nonzero()[0])
    v = smp.flatten(1)[:, i].cpu().var()
    target = e_s2 * c_ref[i, i]
    # sample variance of n draws of a scale mixture with s2 ~ 2 % relative sd: its
    # relative sd is ~ sqrt(2 / n) = 2.2 %; 4 sd -> 9 %, plus 4 % for the mixture
    assert abs(float(v / target) - 1) < 0.13
    assert torch.allclose(mean.flatten().cpu(), m_ref, atol=1e-8, rtol=0)


def _dense_window_cov(pr: GaussianWindowPrior, n_steps: int) -> torch.Tensor:
    w = torch.block_diag(*[pr.basis] * n_steps)
    return w @ pr.amp_cov(n_steps) @ w.T + torch.block_diag(*[pr.resid_cov] * n_steps)


def test_local_and_fixed_spread_keep_the_mean_and_scale_deviations(gen) -> None:
    pr = _window()
    g = gen(3)
    x = pr.sample(1, 6, g)[0]
    z = x.masked_fill(torch.rand(x.shape, generator=g) < 0.5, float("nan"))
    fixed, m0 = pr.posterior_scaled(z, 50, gen(4), "fixed", var_factor=2.25)
    plain, m1 = pr.posterior(z, 50, gen(4))
    assert torch.allclose(m0, m1, atol=1e-12, rtol=0)
    # deviations times sqrt(2.25) = 1.5 exactly (same generator, same draws)
    assert torch.allclose(fixed - m0, 1.5 * (plain - m1), atol=1e-10, rtol=0)
    local, m2 = pr.posterior_scaled(z, 50, gen(4), "local")
    assert torch.allclose(m2, m1, atol=1e-12, rtol=0)
    ok = ((plain - m1).abs() > 1e-6).all(0)  # hidden entries
    ratio = ((local - m2) / (plain - m1))[:, ok]
    # one positive factor per entry, shared by every sample
    assert bool((ratio > 0).all())
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="scale must be"):
        pr.posterior_scaled(z, 2, g, "bogus")


def test_local_spread_learns_a_mis_set_scale_at_isolated_points(gen) -> None:
    """Data drawn from 4 * Sigma (rank-0 Matérn prior on a 6 x 8 grid), 20 % of the
    points hidden at random: the fixed posterior's squared errors are ~4x its variance,
    the local spread model's ~1x (the innovations around each point reveal the scale)."""
    prior = _grid_prior(1.0, nugget=0.05)
    w = prior.window
    g = gen(11)
    x = w.sample(1, 60, g)[0] * 2.0  # (60, 48)
    hid = torch.rand(x.shape, generator=g) < 0.2
    z = x.masked_fill(hid, float("nan"))
    ratios = {}
    for scale in ("fixed", "local"):
        smp, mean = w.posterior_scaled(z, 64, gen(12), scale)
        err2 = ((mean - x)[hid] ** 2).mean()
        ratios[scale] = float(err2 / smp.var(0)[hid].mean())
    # ~580 hidden entries, nearly independent errors: the ratio of means has relative
    # sd ~ sqrt(2 / 580) = 6 %; 4 sd -> 25 % (plus 64-sample variance noise ~ 2 %)
    assert abs(ratios["fixed"] / 4 - 1) < 0.25
    assert abs(ratios["local"] - 1) < 0.25


def test_holdout_factor_recovers_a_known_variance_scale(gen) -> None:
    """Fit-period data drawn from c * Sigma with c = 2.5 while the prior says Sigma:
    the held-out calibration factor (spread "fixed") recovers c; with the window spread
    model, whose scale is re-learnt from the observations, the factor is ~1."""
    prior = _grid_prior(1.0)
    c_true = 2.5
    t = 80
    z = prior.window.sample(1, t, gen(5))[0] * math.sqrt(c_true)  # (80, 48)
    n_tr = 60
    c_fixed = holdout_variance_ratio(prior, z, n_tr, gen(6), "fixed")
    c_window = holdout_variance_ratio(prior, z, n_tr, gen(6), "window")
    # ratio of means over ~20 x 48 x 0.45 ~ 430 hidden entries; spatially correlated
    # errors leave ~100 effective ones: relative sd sqrt(2 / 100) = 0.14, ~2 sd allowed
    # (plus 32-sample variance noise, ~3 %)
    assert abs(c_fixed / c_true - 1) < 0.3
    assert abs(c_window - 1) < 0.3
    # and the fixed factor on data from the prior itself is ~1
    z1 = prior.window.sample(1, t, gen(7))[0]
    assert abs(holdout_variance_ratio(prior, z1, n_tr, gen(8), "fixed") - 1) < 0.3


def test_torus_matern_is_periodic_and_positive_definite() -> None:
    n = 12
    c = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    y, x = (t.flatten() for t in torch.meshgrid(c, c, indexing="ij"))
    k = TorusMatern(y, x, 0.8, 0.01, 2.0).cov()
    # (0, 0) and (0, n-1) are neighbours across the seam, like (0, 0) and (0, 1)
    assert torch.allclose(k[0, n - 1], k[0, 1], atol=1e-12, rtol=0)
    assert torch.allclose(torch.diagonal(k), torch.full((n * n,), 2.0, dtype=k.dtype))
    assert float(torch.linalg.eigvalsh(k).min()) > 0
    with pytest.raises(Exception, match="geometry"):
        fit_residual(torch.zeros(3, n * n), y, x, "plane")


def test_fit_residual_on_the_torus_prefers_the_true_length(gen) -> None:
    n = 10
    c = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    y, x = (t.flatten() for t in torch.meshgrid(c, c, indexing="ij"))
    true = TorusMatern(y, x, 0.8, 0.01, 1.0)
    chol = torch.linalg.cholesky(true.cov())
    z = torch.randn(60, n * n, generator=gen(9), dtype=torch.float64) @ chol.T
    fit = fit_residual(z, y, x, "torus")
    # the LOO grid is (0.1, 0.2, 0.4, 0.8, 1.6): 60 fields pin it to a neighbour at worst
    assert fit.length in (0.4, 0.8, 1.6)
    assert isinstance(fit, TorusMatern)


def test_grid_geometry() -> None:
    c = 2 * np.pi * np.arange(8) / 8
    da = xr.DataArray(np.zeros((2, 8, 8)), dims=("time", "y", "x"), coords={"y": c, "x": c})
    assert grid_geometry(da) == "torus"
    lat = xr.DataArray(np.zeros((2, 3, 4)), dims=("time", "lat", "lon"))
    assert grid_geometry(lat) == "sphere"


def test_state_dict_round_trip_and_old_checkpoints() -> None:
    prior = _grid_prior(1.3)
    prior.var_factor, prior.spread = 1.7, "window"
    back = FieldPrior.from_state_dict(prior.state_dict())
    assert (back.var_factor, back.spread, back.geometry) == (1.7, "window", "sphere")
    old = prior.state_dict()
    for key in ("var_factor", "spread", "geometry"):
        old.pop(key)
    legacy = FieldPrior.from_state_dict(old)  # a checkpoint written before these fields
    assert (legacy.var_factor, legacy.spread, legacy.geometry) == (1.0, "fixed", "sphere")


def _ar_window(resid_rho: float = 0.7) -> GaussianWindowPrior:
    w = _window(p=6)
    return GaussianWindowPrior(w.basis, w.lam, w.rho, w.resid_cov, resid_rho)


def test_ar1_residual_posterior_is_the_exact_conditional(gen) -> None:
    """AR(1)-in-time residual: the dense posterior's mean equals the closed-form
    conditional of ``dense_cov`` to round-off and its samples match its covariance."""
    pr = _ar_window()
    g = gen(13)
    x = pr.sample(1, 4, g)[0]
    hid = torch.rand(x.shape, generator=g) < 0.4
    z = x.masked_fill(hid, float("nan"))
    n = 20000
    smp, mean = pr.posterior(z, n, g)
    m_ref, c_ref = gaussian_conditional(
        torch.zeros(24, dtype=torch.float64), pr.dense_cov(4), z.flatten()
    )
    assert torch.allclose(mean.flatten(), m_ref, atol=1e-9, rtol=0)
    h = hid.flatten()
    flat = smp.reshape(n, -1)[:, h]
    c = c_ref[h][:, h]
    # sd of a sample covariance entry: sqrt((c_ii c_jj + c_ij^2) / n); 5 sd
    tol = 5 * ((torch.diagonal(c)[:, None] * torch.diagonal(c)[None, :] + c**2) / n).sqrt()
    assert bool(((torch.cov(flat.T) - c).abs() <= tol + 1e-12).all())


def test_ar1_prior_samples_have_the_dense_covariance(gen) -> None:
    pr = _ar_window(0.8)
    n = 40000
    smp = pr.sample(n, 3, gen(14)).reshape(n, -1)
    c = pr.dense_cov(3)
    tol = 5 * ((torch.diagonal(c)[:, None] * torch.diagonal(c)[None, :] + c**2) / n).sqrt()
    assert bool(((torch.cov(smp.T) - c).abs() <= tol).all())


@pytest.mark.parametrize("resid_rho", [0.0, 0.6])
def test_one_step_predictive_is_the_gaussian_conditional(resid_rho: float) -> None:
    """anomaly.predictive (the evidence score's Kalman step) = the conditional of step 2
    given a fully observed step 1 under the window's dense covariance, to round-off."""
    from assim.anomaly import predictive

    w = _window(p=6)
    prior = _grid_prior()
    prior._window = GaussianWindowPrior(w.basis, w.lam, w.rho, w.resid_cov, resid_rho)
    gain, s = predictive(prior)
    z1 = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    x = torch.cat([z1, torch.full((6,), float("nan"), dtype=torch.float64)])
    m_ref, c_ref = gaussian_conditional(
        torch.zeros(12, dtype=torch.float64), prior.window.dense_cov(2), x
    )
    assert torch.allclose(gain @ z1, m_ref[6:], atol=1e-9, rtol=0)
    assert torch.allclose(s, c_ref[6:, 6:], atol=1e-9, rtol=0)


def test_cli_on_a_torus_field_with_spread_models(tmp_path, gen) -> None:
    """``assim impute`` on a (time, y, x) field of the periodic square fits a torus prior
    and honours --spread; observed entries are kept bit for bit."""
    from assim.cli import main

    n, t = 6, 12
    c = 2 * np.pi * np.arange(n) / n
    y2, x2 = (v.flatten() for v in torch.meshgrid(torch.tensor(c), torch.tensor(c), indexing="ij"))
    chol = torch.linalg.cholesky(TorusMatern(y2, x2, 0.8, 0.05, 1.0).cov())
    z = torch.randn(t, n * n, generator=gen(15), dtype=torch.float64) @ chol.T
    v = z.reshape(t, n, n).numpy().copy()
    v[3, 1:4, 2:5] = np.nan
    v[7, 0, :] = np.nan
    da = xr.DataArray(v, dims=("time", "y", "x"), coords={"y": c, "x": c}, name="vorticity")
    path = tmp_path / "w.nc"
    da.to_dataset().to_netcdf(path)
    for spread in ("fixed", "local"):
        out, ckpt = tmp_path / f"o_{spread}.nc", tmp_path / f"p_{spread}.pt"
        args = ["impute", str(path), "--var", "vorticity", "--samples", "4"]
        args += ["--spread", spread, "--save-prior", str(ckpt), "--out", str(out)]
        assert main(args) == 0
        sd = torch.load(ckpt, weights_only=True)
        assert (sd["geometry"], sd["spread"]) == ("torus", spread)
        with xr.open_dataset(out) as ds:
            got = ds["vorticity"].values
        ok = np.isfinite(v)
        assert np.array_equal(got[0][ok], v[ok])
        assert np.isfinite(got).all()
