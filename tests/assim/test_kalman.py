"""Kalman filter and RTS smoother against the joint Gaussian of the whole trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.kalman import GaussianState, KalmanFilter, kalman_filter, rts_smoother
from assim.obs import GaussianNoise, Linear, Observation
from models.worlds.linear_gaussian import LinearGaussian

D, M, K = 3, 2, 6


def _model(seed: int = 0):
    rng = np.random.default_rng(seed)
    A = 0.9 * np.linalg.qr(rng.normal(size=(D, D)))[0] + 0.05 * rng.normal(size=(D, D))
    b = rng.normal(size=D) * 0.3
    B = rng.normal(size=(D, D))
    Q = 0.2 * B @ B.T + 0.1 * np.eye(D)
    H = rng.normal(size=(M, D))
    C = rng.normal(size=(M, M))
    R = 0.3 * C @ C.T + 0.2 * np.eye(M)
    m0 = rng.normal(size=D)
    P0 = np.eye(D) + 0.2 * np.ones((D, D))
    ys = rng.normal(size=(K, M)) * 2
    ys[2, 1] = np.nan  # partly observed
    ys[4, :] = np.nan  # not observed at all
    return A, b, Q, H, R, m0, P0, ys


def _joint(A, b, Q, H, R, m0, P0):
    """Mean and covariance of the stacked (x_1..x_K, y_1..y_K)."""
    mu, V = [m0], [P0]
    for _ in range(K):
        mu.append(A @ mu[-1] + b)
        V.append(A @ V[-1] @ A.T + Q)
    mu, V = mu[1:], V[1:]
    Sxx = np.zeros((K * D, K * D))
    for j in range(K):
        for k in range(j, K):
            c = np.linalg.matrix_power(A, k - j) @ V[j]  # Cov(x_k, x_j)
            Sxx[k * D : (k + 1) * D, j * D : (j + 1) * D] = c
            Sxx[j * D : (j + 1) * D, k * D : (k + 1) * D] = c.T
    HH = np.kron(np.eye(K), H)
    mx = np.concatenate(mu)
    my = HH @ mx
    Syy = HH @ Sxx @ HH.T + np.kron(np.eye(K), R)
    Sxy = Sxx @ HH.T
    return mx, my, Sxx, Sxy, Syy


def _condition(mx, my, Sxx, Sxy, Syy, y, keep):
    """x | y[keep] for the joint Gaussian."""
    if not keep.any():
        return mx, Sxx
    G = np.linalg.solve(Syy[np.ix_(keep, keep)], Sxy[:, keep].T).T
    return mx + G @ (y[keep] - my[keep]), Sxx - G @ Sxy[:, keep].T


def test_filter_and_evidence_equal_the_joint_gaussian():
    A, b, Q, H, R, m0, P0, ys = _model()
    res = kalman_filter(*(torch.from_numpy(v) for v in (A, b, Q, H, R, m0, P0, ys)))
    mx, my, Sxx, Sxy, Syy = _joint(A, b, Q, H, R, m0, P0)
    yflat = ys.reshape(-1)
    seen = ~np.isnan(yflat)
    prev = 0.0
    for k in range(K):
        keep = seen & (np.arange(K * M) < (k + 1) * M)  # y_1..y_k
        m, P = _condition(mx, my, Sxx, Sxy, Syy, yflat, keep)
        sl = slice(k * D, (k + 1) * D)
        np.testing.assert_allclose(res.means[k].numpy(), m[sl], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(res.covs[k].numpy(), P[sl, sl], rtol=1e-9, atol=1e-10)
        # log p(y_{1:k}) - log p(y_{1:k-1}) from scipy on the observed block
        lz = (
            stats.multivariate_normal(my[keep], Syy[np.ix_(keep, keep)]).logpdf(yflat[keep])
            if keep.any()
            else 0.0
        )
        assert float(res.log_z[k]) == pytest.approx(lz - prev, rel=1e-9, abs=1e-10)
        prev = lz
    assert float(res.log_z[4]) == 0.0  # the unobserved step adds nothing


def test_rts_smoother_equals_the_joint_posterior():
    A, b, Q, H, R, m0, P0, ys = _model(1)
    t = [torch.from_numpy(v) for v in (A, b, Q, H, R, m0, P0, ys)]
    res = kalman_filter(*t)
    ms, Ps = rts_smoother(t[0], t[1], t[2], res.means, res.covs)
    mx, my, Sxx, Sxy, Syy = _joint(A, b, Q, H, R, m0, P0)
    yflat = ys.reshape(-1)
    m, P = _condition(mx, my, Sxx, Sxy, Syy, yflat, ~np.isnan(yflat))
    np.testing.assert_allclose(ms.reshape(-1).numpy(), m, rtol=1e-8, atol=1e-10)
    for k in range(K):
        sl = slice(k * D, (k + 1) * D)
        np.testing.assert_allclose(Ps[k].numpy(), P[sl, sl], rtol=1e-8, atol=1e-10)
    # smoothing sharpens the filter everywhere but at the last step
    assert all(float(torch.trace(Ps[k])) < float(torch.trace(res.covs[k])) for k in range(K - 1))


def test_kalman_filter_class_equals_the_function(device):
    A, b, Q, H, R, m0, P0, ys = _model(2)
    world = LinearGaussian(torch.from_numpy(A), torch.from_numpy(b), torch.from_numpy(Q))
    obs = Observation(Linear(torch.from_numpy(H)), GaussianNoise(R=torch.from_numpy(R)))
    filt = KalmanFilter(torch.from_numpy(m0), torch.from_numpy(P0))
    state = filt.initialize(Ensemble(torch.zeros(1, D, dtype=torch.float64, device=device)))
    assert isinstance(state, GaussianState)
    res = kalman_filter(*(torch.from_numpy(v) for v in (A, b, Q, H, R, m0, P0, ys)))
    for k in range(K):
        state, info = filt.cycle(world, state, torch.from_numpy(ys[k]).to(device), obs)
        torch.testing.assert_close(state.mean().cpu(), res.means[k])
        torch.testing.assert_close(state.var().cpu(), torch.diagonal(res.covs[k]))
        assert info["log_z"] == pytest.approx(float(res.log_z[k]), rel=1e-10, abs=1e-12)
        assert info["skipped"] == (k == 4)


def test_bad_shapes_raise():
    A, b, Q, H, R, m0, P0, ys = (torch.from_numpy(v) for v in _model())
    with pytest.raises(InputError, match=r"observations must be \(K, 2\)"):
        kalman_filter(A, b, Q, H, R, m0, P0, ys[:, :1])
    with pytest.raises(InputError, match="shapes disagree"):
        kalman_filter(A[:2], b, Q, H, R, m0, P0, ys)
