"""The world-model ensemble smoother (assim/impute_world.py) against closed forms.

Oracle: on a linear-Gaussian world ``x_{k+1} = M x_k + w``, ``w ~ N(0, Q)``, the joint law
of a window ``(x_0, ..., x_{T-1})`` is Gaussian with ``Cov(x_k, x_l) = M^k P_0 (M^l)^T
+ sum_{i<min(k,l)} M^{k-1-i} Q (M^{l-1-i})^T``; conditioning it on the observed entries
(``gaussian_conditional``) is exactly the Kalman (RTS) smoother's mean and covariance.
"""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.impute_world import (
    SmootherConfig,
    ensemble_smoother,
    impute_world,
    stationary_cov,
    torus_taper,
)
from assim.smoother import gaussian_conditional


def joint_cov(m: torch.Tensor, p0: torch.Tensor, q: torch.Tensor, t: int) -> torch.Tensor:
    """Covariance ``(T d, T d)`` of the window of ``x_{k+1} = M x_k + w`` (see above)."""
    d = m.shape[0]
    marg = [p0]
    for _ in range(1, t):
        marg.append(m @ marg[-1] @ m.T + q)
    out = torch.zeros(t * d, t * d, dtype=m.dtype)
    for k in range(t):
        c = marg[k]
        for ell in range(k, t):  # Cov(x_l, x_k) = M^(l-k) P_k
            out[ell * d : (ell + 1) * d, k * d : (k + 1) * d] = c
            out[k * d : (k + 1) * d, ell * d : (ell + 1) * d] = c.T
            c = m @ c
    return out


def problem(device, d: int = 6, t: int = 4, noise: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = 0.9 * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    p0 = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    q = noise**2 * torch.eye(d, dtype=torch.float64)
    mu0 = torch.randn(d, generator=g, dtype=torch.float64)
    lq = q.sqrt()

    def step(x, generator=None):
        out = x @ m.to(x).T
        if noise:
            e = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            out = out + e @ lq.to(x).T
        return out

    return m.to(device), p0, q, mu0, step


def exact_moment_ensemble(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int):
    """``(n, d)`` members whose sample mean and covariance equal ``mu`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mu.numel(), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    lz = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(lz, z.T, upper=False).T  # sample cov = I
    return mu + z @ torch.linalg.cholesky(cov).T


def oracle(mu0, p0, q, m, y):
    t, d = y.shape
    mean = torch.cat([torch.linalg.matrix_power(m.cpu(), k) @ mu0 for k in range(t)])
    return gaussian_conditional(mean, joint_cov(m.cpu(), p0, q, t), y.flatten().cpu())


def test_deterministic_linear_world_is_exact_kalman_smoother(device):
    # Q = 0, r = 0, no taper, lambda = 1, full lag: the EnKS update is linear in the
    # members with the gain of their own sample moments, so exact initial moments give the
    # Kalman smoother's mean and covariance up to round-off.
    m, p0, q, mu0, step = problem(device)
    t, d = 4, 6
    y = torch.full((t, d), float("nan"), dtype=torch.float64)
    truth = mu0.clone()
    g = torch.Generator().manual_seed(3)
    truth = truth + torch.linalg.cholesky(p0) @ torch.randn(d, generator=g, dtype=torch.float64)
    obs = [(0, [1, 4]), (1, [2]), (3, [0, 5])]  # 5 constraints < d: posterior stays proper
    for k, idx in obs:
        xk = torch.linalg.matrix_power(m.cpu(), k) @ truth
        y[k, idx] = xk[idx]
    x0 = exact_moment_ensemble(mu0, p0, 20, seed=1).to(device)
    smp, mean = ensemble_smoother(step, x0, y.to(device), SmootherConfig(lag=t))
    o_mean, o_cov = oracle(mu0, p0, q, m, y)
    flat = smp.reshape(20, -1).cpu()
    torch.testing.assert_close(mean.flatten().cpu(), o_mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(torch.cov(flat.T), o_cov, atol=1e-9, rtol=1e-9)
    # the filter-only answer (lag 0) differs from the smoother's at the earlier steps
    _, mean0 = ensemble_smoother(step, x0, y.to(device), SmootherConfig(lag=0))
    assert (mean0[0] - mean[0]).abs().max() > 1e-3


def test_stochastic_linear_world_matches_kalman_smoother_within_mc_error(device):
    # Q > 0 and noisy observations (r = 0.3, perturbed observations): consistent as N grows.
    # R = 16 independent runs of N = 1000 members; the run-to-run standard deviation s_e of
    # each entry of the ensemble mean is measured, and the average over runs must be within
    # 5 s_e / sqrt(R) of the oracle (the EnKF's O(1/N) bias is ~1e-3 sd, far below).
    # Covariance: the pooled sample covariance (R N draws) within 6 sqrt((S_ii S_jj +
    # S_ij^2) / (R N)) (Wishart sd of an entry) plus 0.02 max S (gain sampling error ~d/N).
    d, t, n, reps = 4, 4, 1000, 16
    m, p0, q, mu0, step = problem(device, d=d, t=t, noise=0.5, seed=5)
    g = torch.Generator().manual_seed(7)
    y = torch.randn(t, d, generator=g, dtype=torch.float64) * 2
    y[0, :2] = float("nan")
    y[1, 1:] = float("nan")
    y[2] = float("nan")
    r = 0.3
    cfg = SmootherConfig(lag=t, obs_std=r)
    means, flats = [], []
    for rep in range(reps):
        gen = torch.Generator().manual_seed(100 + rep)
        x0 = (
            mu0
            + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(p0).T
        )
        smp, mean = ensemble_smoother(step, x0.to(device), y.to(device), cfg, generator=gen)
        means.append(mean.flatten().cpu())
        flats.append(smp.reshape(n, -1).cpu())
    # oracle with observation noise: condition the joint of (x, y) on y
    big = joint_cov(m.cpu(), p0, q, t)
    mean = torch.cat([torch.linalg.matrix_power(m.cpu(), k) @ mu0 for k in range(t)])
    io = torch.isfinite(y.flatten()).nonzero().squeeze(1)
    s = big[io][:, io] + r**2 * torch.eye(io.numel(), dtype=torch.float64)
    gain = torch.linalg.solve(s, big[io]).T
    o_mean = mean + gain @ (y.flatten()[io] - mean[io])
    o_cov = big - gain @ big[io]
    means = torch.stack(means)
    se = means.std(0) / math.sqrt(reps)
    assert ((means.mean(0) - o_mean).abs() <= 5 * se + 1e-12).all()
    pooled = torch.cov(torch.cat([f - f.mean(0) for f in flats]).T)
    sd = torch.diagonal(o_cov).sqrt()
    tol = 6 * ((sd[:, None] * sd[None, :]) ** 2 + o_cov**2).div(reps * n).sqrt()
    assert ((pooled - o_cov).abs() <= tol + 0.02 * o_cov.abs().max()).all()


def test_observed_entries_bit_for_bit_and_errors(device):
    class ToyWorld:  # a noisy linear world on a 4 x 4 torus, float32 like the learned ones
        state_shape = (4, 4)
        dt = 0.2

        def step(self, x, generator=None):
            e = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            return 0.8 * torch.roll(x, 1, dims=-1) + 0.3 * e

    g = torch.Generator().manual_seed(0)
    vals = torch.randn(5, 16, generator=g, dtype=torch.float32).to(device)
    vals[torch.rand(5, 16, generator=g).to(device) < 0.4] = float("nan")
    obs = torch.isfinite(vals)
    x0 = torch.randn(8, 16, generator=g, dtype=torch.float64).to(device)
    b = stationary_cov(torch.randn(30, 4, 4, generator=g, dtype=torch.float64)).to(device)
    for cfg in (SmootherConfig(), SmootherConfig(inflation=1.3, additive=0.5, obs_std=0.2)):
        smp, mean = impute_world(ToyWorld(), vals, x0, cfg, b, radius=1.5, generator=g)
        assert smp.dtype == vals.dtype and smp.shape == (8, 5, 16)
        assert torch.equal(smp[:, obs], vals[obs].expand(8, -1))
        assert torch.equal(mean[obs], vals[obs])
        assert torch.isfinite(smp).all() and (smp[:, ~obs].std(0) > 0).all()
    with pytest.raises(InputError, match="nothing is observed"):
        impute_world(ToyWorld(), torch.full((2, 16), float("nan")), x0)
    with pytest.raises(InputError, match="world's grid"):
        impute_world(ToyWorld(), vals[:, :9], x0)
    with pytest.raises(InputError, match="static covariance"):
        impute_world(ToyWorld(), vals, x0, SmootherConfig(additive=1.0))


def test_stationary_cov_and_taper_are_valid_covariances():
    # A white field with variance 2 has covariance 2 I; a shifted copy of a field gives a
    # circulant matrix: check exactly against the direct empirical covariance of all shifts.
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    shifts = torch.stack(
        [torch.roll(f, (a, c), (1, 2)) for a in range(4) for c in range(5)], 1
    ).reshape(-1, 20)  # every translate of every sample
    torch.testing.assert_close(stationary_cov(f), shifts.T @ shifts / shifts.shape[0])
    rho = torus_taper((6, 6), 1.0)
    assert torch.allclose(torch.diagonal(rho), torch.ones(36, dtype=torch.float64))
    assert torch.allclose(rho, rho.T) and torch.linalg.eigvalsh(rho).min() > -1e-10


def test_spread_factor_rescales_deviations_only(device):
    # Same generator seed: the run is identical up to the output rescaling, so the
    # deviations from the (unchanged) mean scale exactly by c; observed entries stay y.
    m, p0, q, mu0, step = problem(device, d=5, t=3, noise=0.3, seed=2)
    y = torch.full((3, 5), float("nan"), dtype=torch.float64)
    y[0, 1], y[2, 3] = 0.5, -1.0
    x0 = (
        mu0 + torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ).to(device)
    runs = []
    for c in (1.0, 1.7):
        g = torch.Generator().manual_seed(4)
        runs.append(
            ensemble_smoother(step, x0, y.to(device), SmootherConfig(spread=c), generator=g)
        )
    (s1, m1), (s2, m2) = runs
    torch.testing.assert_close(m2, m1)
    torch.testing.assert_close(s2 - m2, 1.7 * (s1 - m1))
    assert torch.equal(s2[:, 0, 1].cpu(), torch.full((12,), 0.5, dtype=torch.float64))
    for bad in (dict(spread=0.0), dict(inflation=-1.0), dict(lag=-1), dict(obs_std=-0.1)):
        with pytest.raises(InputError):
            SmootherConfig(**bad)
