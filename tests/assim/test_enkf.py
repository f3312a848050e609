"""Ensemble Kalman filters against closed forms (BENCHMARKS.md C) and each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.enkf import ETKF, EnKF, make_filter
from assim.filters.letkf import LETKF, gaspari_cohn, local_taper
from assim.obs import GaussianNoise, Identity, Linear, Observation, Subset

F64 = torch.float64


def _kalman(mu, P, H, R, y):
    """Closed-form Kalman analysis of the prior N(mu, P): mean, covariance, log p(y)."""
    S = H @ P @ H.T + R
    K = torch.linalg.solve(S, H @ P).T
    mean = mu + K @ (y - H @ mu)
    cov = P - K @ H @ P
    log_z = torch.distributions.MultivariateNormal(H @ mu, covariance_matrix=S).log_prob(y)
    return mean, cov, float(log_z)


def _moments(x):
    mu = x.mean(0)
    a = x - mu
    return mu, a.T @ a / (x.shape[0] - 1)


def _problem(device, d=6, m=4, n=15, full_r=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64)).to(
        device
    )
    H = torch.randn(m, d, generator=g, dtype=F64)
    if full_r:
        B = torch.randn(m, m, generator=g, dtype=F64)
        noise = GaussianNoise(R=B @ B.T / m + 0.5 * torch.eye(m, dtype=F64))
    else:
        noise = GaussianNoise(var=torch.rand(m, generator=g, dtype=F64) + 0.2)
    y = torch.randn(m, generator=g, dtype=F64).to(device)
    return x, Observation(Linear(H.to(device)), noise), H.to(device), y


@pytest.mark.parametrize("full_r", [False, True])
@pytest.mark.parametrize("dims", [(6, 4, 15), (6, 9, 5)], ids=["obs-space", "ens-space"])
def test_etkf_equals_kalman_of_sample_moments(device, full_r, dims):
    # The ETKF analysis mean/covariance are the Kalman update of the ensemble's sample
    # mean/covariance (Hunt et al. 2007), exactly up to round-off -- for N > d (the
    # issue's case, m < N: observation-space branch) and, in the ensemble subspace, also
    # for N < m (ensemble-space branch).
    d, m, n = dims
    x, obs, H, y = _problem(device, d=d, m=m, n=n, full_r=full_r)
    mu, P = _moments(x)
    R = obs.noise.covariance(H.shape[0]).to(device=device, dtype=F64)
    mean, cov, log_z = _kalman(mu, P, H, R, y)
    out, info = ETKF().analysis(Ensemble(x), y, obs)
    mu_a, P_a = _moments(out.x)
    assert out.x.device == x.device and out.x.dtype == x.dtype
    torch.testing.assert_close(mu_a, mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(P_a, cov, atol=1e-9, rtol=1e-9)
    assert info["log_z"] == pytest.approx(log_z, abs=1e-9)
    assert info["ess"] == x.shape[0] and info["log_z_approx"] is True


def test_etkf_float32_input_is_returned_as_float32(device):
    x, obs, H, y = _problem(device)
    out, _ = ETKF().analysis(Ensemble(x.float()), y.float(), obs)
    ref, _ = ETKF().analysis(Ensemble(x.float().double()), y.float().double(), obs)
    assert out.x.dtype == torch.float32
    torch.testing.assert_close(out.x.double(), ref.x, atol=1e-5, rtol=1e-5)


def test_stochastic_enkf_large_n_matches_kalman(device, gen):
    # The perturbations are centred, so the analysis mean equals the Kalman mean of the
    # sample moments exactly. The covariance differs from Kalman's by K(S_z - R)K^T and
    # cross terms A^T Z K^T / (N-1): sample-covariance noise with entry s.d. at most
    # sqrt((P_ii P_jj + P_ij^2) / N) (Wishart), P the prior; we allow 5 of those.
    # Omitting the perturbations would miss K R K^T (entry [0, 0] ~0.2 >> tol ~0.02).
    n, d, m = 100_000, 3, 2
    g = gen(1)
    L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.2, -0.3, 0.8]], dtype=F64)
    x = (torch.randn(n, d, generator=g, dtype=F64) @ L.T + torch.tensor([1.0, -2.0, 0.5])).to(
        device
    )
    H = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64, device=device)
    obs = Observation(Linear(H), GaussianNoise(var=torch.tensor([0.5, 0.8], dtype=F64)))
    y = torch.tensor([2.0, -1.0], dtype=F64, device=device)
    mu, P = _moments(x)
    R = obs.noise.covariance(m).to(device=device, dtype=F64)
    mean, cov, _ = _kalman(mu, P, H, R, y)
    out, _ = EnKF().analysis(Ensemble(x), y, obs, generator=gen(7, device))
    mu_a, P_a = _moments(out.x)
    torch.testing.assert_close(mu_a, mean, atol=1e-9, rtol=1e-9)
    dg = torch.diagonal(P)
    tol = 5 * torch.sqrt((dg[:, None] * dg[None, :] + P**2) / n)
    assert bool(((P_a - cov).abs() <= tol).all()), (P_a - cov, tol)
    K = P @ H.T @ torch.linalg.inv(H @ P @ H.T + R)
    assert float((K @ R @ K.T)[0, 0]) > 3 * float(tol[0, 0])  # the test can fail


def _l96_like(device, d=40, n=20, seed=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=F64)
    # smooth, spatially correlated anomalies on a periodic grid
    k = torch.arange(d, dtype=F64)
    modes = torch.stack([torch.cos(2 * math.pi * j * k / d + j) for j in range(1, 8)])
    x = base + torch.randn(n, 7, generator=g, dtype=F64) @ modes
    x = x + 0.3 * torch.randn(n, d, generator=g, dtype=F64)
    return x.to(device), g


@pytest.mark.parametrize("kw", [{}, {"inflation": 1.07}, {"rtps": 0.6}])
def test_letkf_infinite_radius_equals_etkf(device, kw):
    x, g = _l96_like(device)
    obs = Observation(Subset(every=2), GaussianNoise(std=0.7))
    y = torch.randn(20, generator=g, dtype=F64).to(device)
    y[3] = float("nan")
    a, ia = ETKF(**kw).analysis(Ensemble(x), y, obs)
    b, ib = LETKF(radius=math.inf, **kw).analysis(Ensemble(x), y, obs)
    torch.testing.assert_close(b.x, a.x, atol=1e-8, rtol=0)
    assert ib["log_z"] == pytest.approx(ia["log_z"], abs=1e-8)


def _letkf_reference(x, y, H, r_var, radius, d):
    """Per-grid-point loop of Hunt et al. (2007) eqs. (20)-(24), with R^{-1} multiplied
    elementwise by rho (scipy sqrtm for the symmetric square root)."""
    n = x.shape[0]
    mu = x.mean(0)
    A = x - mu
    Y = (x @ H.T) - (x @ H.T).mean(0)
    dy = y - mu @ H.T
    obs_pos = torch.nonzero(H)[:, 1].to(F64)
    out = torch.empty_like(x)
    for j in range(d):
        dist = (obs_pos - j).abs()
        dist = torch.minimum(dist, d - dist)
        rho = gaspari_cohn(dist / (1.82 * radius))
        rho = torch.where(rho > 1e-3, rho, torch.zeros_like(rho))
        Rinv = torch.diag(rho / r_var)
        Pt = torch.linalg.inv((n - 1) * torch.eye(n, dtype=F64) + Y @ Rinv @ Y.T)
        W = torch.as_tensor(scipy.linalg.sqrtm(((n - 1) * Pt).numpy()).real)
        w = Pt @ Y @ Rinv @ dy
        out[:, j] = mu[j] + (W + w[:, None]).T @ A[:, j]
    return out


@pytest.mark.parametrize("n", [4, 12], ids=["ens-space", "obs-space"])
def test_letkf_matches_per_gridpoint_loop(n):
    # up to 5 local observations: N=4 takes the ensemble-space branch, N=12 the other
    d, radius = 24, 2.0
    x, g = _l96_like("cpu", d=d, n=n, seed=5)
    obs = Observation(Subset(every=3), GaussianNoise(std=0.5))
    H = obs.operator.matrix((d,), dtype=F64)
    y = torch.randn(H.shape[0], generator=g, dtype=F64) + x.mean(0) @ H.T
    out, _ = LETKF(radius=radius).analysis(Ensemble(x), y, obs)
    ref = _letkf_reference(x, y, H, 0.25, radius, d)
    torch.testing.assert_close(out.x, ref, atol=1e-9, rtol=1e-9)
    # and localisation matters here: the global ETKF differs
    glob, _ = ETKF().analysis(Ensemble(x), y, obs)
    assert float((glob.x - out.x).abs().max()) > 1e-2


def test_letkf_leaves_points_outside_support_untouched():
    d = 40
    x, _ = _l96_like("cpu", d=d, n=10)
    y = torch.full((d,), float("nan"), dtype=F64)
    y[0] = 3.0
    out, _ = LETKF(radius=1.0).analysis(
        Ensemble(x), y, Observation(Identity(), GaussianNoise(std=1.0))
    )
    changed = (out.x - x).abs().amax(0) > 1e-12
    dist = torch.minimum(torch.arange(d), d - torch.arange(d))
    assert bool(changed[dist <= 3].all())  # support is 2 * 1.82 = 3.64
    assert not bool(changed[dist >= 4].any())


def test_gaspari_cohn_shape():
    r = torch.linspace(0, 2.5, 251, dtype=F64)
    f = gaspari_cohn(r)
    assert float(f[0]) == 1.0 and bool((f[r >= 2] == 0).all())
    assert bool((f[1:] <= f[:-1] + 1e-15).all())  # non-increasing
    # continuity where the two polynomial pieces of GC eq. 4.10 meet (r = 1)
    left, right = (
        gaspari_cohn(torch.tensor([1 - 1e-9], dtype=F64)),
        gaspari_cohn(torch.tensor([1 + 1e-9], dtype=F64)),
    )
    assert float((left - right).abs()) < 1e-7
    idx, rho = local_taper((10,), torch.tensor([[0.0], [5.0]]), radius=math.inf)
    assert idx.shape == (10, 2) and bool((rho == 1).all())


def test_inflation_scales_analysis_anomalies(device):
    x, obs, H, y = _problem(device, d=5, m=5, n=8)
    a, _ = ETKF().analysis(Ensemble(x), y, obs)
    b, info = ETKF(inflation=1.3).analysis(Ensemble(x), y, obs)
    torch.testing.assert_close(b.x.mean(0), a.x.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(b.x - b.x.mean(0), 1.3 * (a.x - a.x.mean(0)), atol=1e-10, rtol=0)
    assert info["inflation"] == 1.3


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rtps_relaxes_spread_to_prior(device, alpha):
    x, obs, H, y = _problem(device, d=5, m=5, n=8)
    a, _ = ETKF().analysis(Ensemble(x), y, obs)
    b, _ = ETKF(rtps=alpha).analysis(Ensemble(x), y, obs)
    sb, sa, s = x.std(0), a.x.std(0), b.x.std(0)
    torch.testing.assert_close(s, sa + alpha * (sb - sa), atol=1e-10, rtol=0)
    torch.testing.assert_close(b.x.mean(0), a.x.mean(0), atol=1e-10, rtol=0)
    assert float((sb - sa).min()) > 1e-3  # the analysis did shrink the spread


@pytest.mark.parametrize("cls", [ETKF, EnKF, lambda: LETKF(radius=3.0)])
def test_nan_observations_are_dropped(device, cls, gen):
    x, g = _l96_like(device, d=12, n=9)
    y = torch.randn(12, generator=g, dtype=F64).to(device)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[1, 4, 5, 11]] = False
    y_nan = y.clone()
    y_nan[~keep.to(device)] = float("nan")
    obs = Observation(Identity(), GaussianNoise(std=0.9))
    sub = Observation(Subset(torch.nonzero(keep).reshape(-1)), GaussianNoise(std=0.9))
    a, ia = cls().analysis(Ensemble(x), y_nan, obs, generator=gen(0, device))
    b, ib = cls().analysis(Ensemble(x), y[keep.to(device)], sub, generator=gen(0, device))
    torch.testing.assert_close(a.x, b.x, atol=1e-10, rtol=0)
    assert ia["log_z"] == pytest.approx(ib["log_z"], abs=1e-10)
    # all-NaN: unchanged, recorded as skipped
    c, ic = cls().analysis(Ensemble(x), torch.full_like(y, float("nan")), obs)
    assert ic["skipped"] and torch.equal(c.x, x)


def test_bad_input_raises_clear_errors():
    x, obs, H, y = _problem("cpu")
    with pytest.raises(InputError, match="observation y has 3 entries"):
        ETKF().analysis(Ensemble(x), y[:3], obs)
    log_w = torch.log_softmax(torch.arange(x.shape[0], dtype=F64), 0)
    with pytest.raises(InputError, match="equally weighted"):
        ETKF().analysis(Ensemble(x, log_w), y, obs)
    with pytest.raises(InputError, match="inflation"):
        ETKF(inflation=-1.0)
    with pytest.raises(InputError, match="radius"):
        make_filter("letkf", radius=0.0)
    with pytest.raises(InputError, match="does not take"):
        make_filter("etkf", radius=3.0)
    with pytest.raises(InputError, match="unknown ensemble method"):
        make_filter("kalmanish")


def test_make_filter_builds_each_method():
    assert isinstance(make_filter("enkf", inflation=1.1), EnKF)
    assert isinstance(make_filter("EnKF-sqrt", rtps=None), ETKF)
    f = make_filter("letkf", radius=3.0, inflation=1.05)
    assert isinstance(f, LETKF) and f.radius == 3.0 and f.inflation == 1.05


def test_stochastic_enkf_ensemble_space_mean_is_kalman(device, gen):
    # m >= N takes the ensemble-space branch; centred perturbations leave the mean
    # update equal to the Kalman mean of the sample moments, exactly.
    x, obs, H, y = _problem(device, d=6, m=9, n=5, full_r=False)
    mu, P = _moments(x)
    R = obs.noise.covariance(9).to(device=device, dtype=F64)
    mean, _, log_z = _kalman(mu, P, H, R, y)
    out, info = EnKF().analysis(Ensemble(x), y, obs, generator=gen(3, device))
    torch.testing.assert_close(out.x.mean(0), mean, atol=1e-9, rtol=1e-9)
    assert info["log_z"] == pytest.approx(log_z, abs=1e-9)
    assert float((out.x - x).std()) > 0  # perturbations did act on the members


@pytest.mark.parametrize("dims", [(4, 3, 10), (5, 9, 6)], ids=["obs-space", "ens-space"])
def test_stochastic_enkf_equals_dapper_pertobs_formula(device, dims):
    # DAPPER's EnKF('PertObs') written out in numpy with the same perturbations:
    # D = centred N(0, R) draws rescaled by sqrt(N/(N-1)) (DAPPER's mean0), C = Y^T Y +
    # (N-1) R, x_i <- x_i + A^T Y C^{-1} (y - D_i - h(x_i)); both branches, to 1e-10.
    d, m, n = dims
    x, obs, H, y = _problem(device, d=d, m=m, n=n, full_r=False, seed=7)
    out, _ = EnKF().analysis(Ensemble(x), y, obs, generator=torch.Generator().manual_seed(3))
    z = torch.randn(n, m, generator=torch.Generator().manual_seed(3), dtype=F64).numpy()
    sd = obs.noise.var.sqrt().numpy()
    D = -(z - z.mean(0)) * math.sqrt(n / (n - 1)) * sd  # ours adds +z in whitened units
    X, Hn, yn = x.cpu().numpy(), H.cpu().numpy(), y.cpu().numpy()
    A = X - X.mean(0)
    Eo = X @ Hn.T
    Y = Eo - Eo.mean(0)
    C = Y.T @ Y + (n - 1) * np.diag(sd**2)
    want = X + (yn - D - Eo) @ np.linalg.solve(C, Y.T @ A)
    np.testing.assert_allclose(out.x.cpu().numpy(), want, rtol=1e-10, atol=1e-10)
