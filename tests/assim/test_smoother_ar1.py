"""The AR(1)-residual window posterior (block-tridiagonal precision path,
:mod:`assim.smoother_ar1`) against the dense Gaussian conditional, and the held-out
choice of the residual's lag-1 correlation (``fit_field_prior(temporal_residual=
"holdout")``)."""

from __future__ import annotations

import pytest
import torch

from assim.errors import InputError
from assim.impute import fit_field_prior
from assim.impute_holdout import select_resid_rho
from assim.smoother import GaussianWindowPrior, gaussian_conditional
from assim.smoother_ar1 import ar1_precision


def _prior(r: int, resid_rho: float, p: int = 7, seed: int = 0) -> GaussianWindowPrior:
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0.0, 1.0, p, dtype=torch.float64)
    k = torch.exp(-(x[:, None] - x[None, :]).abs() / 0.3) + 0.05 * torch.eye(p).double()
    u = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))[0]
    lam = 0.5 + torch.rand(r, generator=g, dtype=torch.float64)
    rho = 0.9 * torch.rand(r, generator=g, dtype=torch.float64)
    return GaussianWindowPrior(u, lam, rho, k, resid_rho)


def _case(r: int, n_steps: int, seed: int = 1):
    """A window with a fully observed first step and a fully missing last one."""
    pr = _prior(r, 0.6)
    g = torch.Generator().manual_seed(seed)
    x = pr.sample(1, n_steps, g)[0]
    hid = torch.rand(x.shape, generator=g) < 0.5
    if n_steps > 1:
        hid[0], hid[-1] = False, True
    return pr, x.masked_fill(hid, float("nan")), hid


@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_ar1_precision_is_the_inverse_correlation(n_steps: int) -> None:
    k = torch.arange(n_steps, dtype=torch.float64)
    corr = 0.7 ** (k[:, None] - k[None, :]).abs()
    eye = torch.eye(n_steps, dtype=torch.float64)
    assert torch.allclose(ar1_precision(n_steps, 0.7) @ corr, eye, atol=1e-12)


@pytest.mark.parametrize("r", [0, 2])
@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_ar1_path_mean_and_evidence_are_the_dense_conditional(r: int, n_steps: int) -> None:
    """Posterior mean (to round-off), observed entries reproduced by every sample, and
    ``q = y^T Sigma_OO^{-1} y`` of the scores, against the dense covariance."""
    pr, z, hid = _case(r, n_steps)
    p = z.shape[1]
    smp, mean = pr.posterior(z, 3, torch.Generator().manual_seed(2))
    cov = pr.dense_cov(n_steps)
    m_ref, _ = gaussian_conditional(torch.zeros(n_steps * p).double(), cov, z.flatten())
    assert torch.allclose(mean.flatten(), m_ref, atol=1e-10, rtol=0)
    obs = ~hid
    assert torch.allclose(smp[:, obs], z[obs].expand(3, -1), atol=1e-10, rtol=0)
    o = obs.flatten()
    y = z.flatten()[o]
    q_ref = float(y @ torch.linalg.solve(cov[o][:, o], y))
    q, n_obs = pr.mahalanobis(z)
    assert q == pytest.approx(q_ref, rel=1e-10)
    assert n_obs == int(o.sum())


def test_ar1_path_local_scores_estimate_the_exact_ones() -> None:
    """The "local" spread model's leave-one-out sums use ``(Sigma_OO^{-1})_ii`` estimated
    from the Matheron draws: with 4000 draws each estimate has relative sd
    sqrt(2 / 4000) ~ 2 %; the weighted sums agree with the exact ones within 8 %."""
    pr, z, hid = _case(2, 5)
    n = 4000
    *_, (num, den) = pr._posterior(z, n, torch.Generator().manual_seed(3), local=True)
    cov = pr.dense_cov(5)
    o = (~hid).flatten()
    prec = torch.linalg.inv(cov[o][:, o])
    alpha = prec @ z.flatten()[o]
    e2 = torch.zeros(o.numel(), dtype=torch.float64)
    e2[o] = alpha**2 / torch.diagonal(prec)
    sd = torch.diagonal(pr.resid_cov).sqrt()
    w = (pr.resid_cov / (sd[:, None] * sd[None, :])).clamp_min(0)
    assert torch.allclose(den, (~hid).double().sum(0) @ w, rtol=1e-12)
    assert torch.allclose(num, e2.reshape(5, -1).sum(0) @ w, rtol=0.08)


def _ar1_fields(rho_e: float, t: int = 120, seed: int = 5):
    """``t`` fields on a 4 x 6 grid: a Matérn-like residual that is AR(1) in time."""
    lat = torch.linspace(-10.0, 10.0, 4, dtype=torch.float64).repeat_interleave(6)
    lon = torch.linspace(100.0, 150.0, 6, dtype=torch.float64).repeat(4)
    pr = _prior(0, rho_e, p=24, seed=seed)
    x = pr.sample(1, t, torch.Generator().manual_seed(seed))[0]
    return x, torch.zeros(t, dtype=torch.long), lat, lon


@pytest.mark.parametrize(("rho_e", "allowed"), [(0.0, (0.0, 0.2)), (0.6, (0.4, 0.6, 0.8))])
def test_holdout_choice_of_the_residual_lag_correlation(rho_e: float, allowed) -> None:
    """Fields with a white residual get 0 or 0.2, with an AR(1) residual of 0.6 a
    candidate next to it; the fitted prior's window uses the chosen value."""
    x, grp, lat, lon = _ar1_fields(rho_e)
    kw = dict(rank=0, calibrate=False)
    pr = fit_field_prior(x, grp, lat, lon, 1, temporal_residual="holdout", **kw)
    assert pr.resid_rho in allowed
    assert pr.window.resid_rho == pr.resid_rho
    z = pr.standardize(x, grp)
    rho, sse = select_resid_rho(pr, z, 90, torch.Generator().manual_seed(0))
    assert sse[rho] == min(sse.values()) and rho in allowed


def test_temporal_residual_rejects_unknown_strings() -> None:
    x, grp, lat, lon = _ar1_fields(0.0, t=12)
    with pytest.raises(InputError, match="temporal_residual.*'holdout'"):
        fit_field_prior(x, grp, lat, lon, 1, rank=0, temporal_residual="persistence")
