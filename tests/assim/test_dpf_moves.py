"""Exact MCMC moves and the hybrid update of the diffusion particle filter.

Monte-Carlo tolerances. The moved particles are independent across particles (every
particle has its own chain), so for ``N`` whitened residuals ``z = L^{-1}(x - mu)`` of an
exact sampler each component has mean 0 with s.e. ``1/sqrt(N)``, variance 1 with s.e.
``sqrt(2/N)`` and cross-moment 0 with s.e. ``1/sqrt(N)``; we allow 4.5 s.e. (a handful of
statistics per test: family-wise false-alarm probability below 1e-4). Scalar targets
without a closed form use quadrature on a fine grid (error << MC error).
"""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf import DiffusionParticleFilter, make_dpf
from assim.filters.dpf_local import LocalDiffusionParticleFilter
from assim.filters.dpf_moves import pcn_moves
from assim.guidance import ObsSpace
from assim.obs import Arctan, Coarsen, GaussianNoise, Identity, Linear, Observation, Subset
from assim.obs_noise import StudentTNoise
from models.diffusion.kernel import GaussianKernel
from models.worlds.diffusion_lg import DiffusionLinearGaussian
from tests.assim.test_dpf import (
    _run,
    _within,
    assert_matches_kalman,
    linear_case,
)

F64 = torch.float64
K_SE = 4.5


def _gaussian_posterior(m: torch.Tensor, v: torch.Tensor, H, R, y):
    """Posterior of ``N(m_n, diag v) N(y; H x, R)``: means ``(N, d)``, covariance."""
    Ri = torch.linalg.inv(R)
    P = torch.linalg.inv(torch.diag(1.0 / v) + H.T @ Ri @ H)
    mu = (m / v + (H.T @ Ri @ y)) @ P  # P symmetric
    return mu, P


def _check_whitened(x, mu, P) -> None:
    n = x.shape[0]
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(P), (x - mu).T, upper=False).T
    se_mean, se_var = 1 / math.sqrt(n), math.sqrt(2 / n)
    assert float(z.mean(0).abs().max()) < K_SE * se_mean
    c = z.T @ z / n
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    assert float((torch.diagonal(c) - 1).abs().max()) < K_SE * se_var
    assert float(((c - eye) * (1 - eye)).abs().max()) < K_SE * se_mean


@pytest.mark.parametrize(
    "operator, noise",
    [
        (Coarsen(2), GaussianNoise(std=0.3)),  # diagonal: blockwise acceptance, blocks of 2
        (Subset(every=2), GaussianNoise(std=0.3)),  # free (unobserved) elements
        (Linear(torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.2, 1.0, 0.7, 0.1]])),
         GaussianNoise(R=torch.tensor([[0.2, 0.05], [0.05, 0.1]]))),  # dense: per particle
    ],
)  # fmt: skip
def test_pcn_moves_leave_the_gaussian_target_invariant(operator, noise, device):
    """Draw exactly from ``N(m_n, diag v) N(y; Hx, R)`` (per-particle means), apply moves:
    the whitened residuals keep mean 0 and covariance I. Starting from the kernel alone
    (the prior), the same moves reach the target; the prior itself fails the check, so
    the check can detect a move that ignores the likelihood."""
    d, n = 4, 20_000
    g = torch.Generator(device=device).manual_seed(0)
    obs = Observation(operator, noise)
    space = ObsSpace(obs, (d,), F64, device)
    assert space.diagonal == (noise.R is None)
    v = torch.tensor([0.5, 1.0, 0.3, 0.8], dtype=F64, device=device)
    m = torch.randn(n, d, generator=g, dtype=F64, device=device)
    y = torch.tensor([0.4, -0.3], dtype=F64, device=device)[: space.m]
    H = space.H
    R = noise.covariance(space.m).to(device=device, dtype=F64)
    mu, P = _gaussian_posterior(m, v, H, R, y)
    L = torch.linalg.cholesky(P)
    x = mu + torch.randn(n, d, generator=g, dtype=F64, device=device) @ L.T
    kern = GaussianKernel(m, v)
    moved, acc = pcn_moves(x, kern, space, y, n_moves=5, beta=0.6, generator=g)
    assert 0.2 < acc < 1.0
    assert float((moved != x).any(1).to(F64).mean()) > 0.5  # the moves do move
    _check_whitened(moved, mu, P)
    prior = kern.sample(g)
    with pytest.raises(AssertionError):
        _check_whitened(prior, mu, P)
    reached, _ = pcn_moves(prior, kern, space, y, n_moves=60, beta=0.6, generator=g)
    _check_whitened(reached, mu, P)


def test_pcn_moves_on_a_nonlinear_target_match_quadrature(device):
    """Arctan of every 2nd element (blockwise + free elements): start from the prior,
    move, compare per-element mean/variance with quadrature of the 1-D targets
    ``N(x; m_i, v_i) N(y_i; arctan(x), r)`` (unobserved: the prior)."""
    d, n, r = 4, 20_000, 0.05**2
    g = torch.Generator(device=device).manual_seed(1)
    obs = Observation(Arctan(Subset(every=2)), GaussianNoise(var=r))
    space = ObsSpace(obs, (d,), F64, device)
    m = torch.tensor([0.5, -1.0, 2.5, 0.0], dtype=F64, device=device)
    v = torch.tensor([1.0, 0.5, 4.0, 2.0], dtype=F64, device=device)
    y = torch.tensor([0.2, 1.1], dtype=F64, device=device)
    kern = GaussianKernel(m.expand(n, d), v)
    x, acc = pcn_moves(kern.sample(g), kern, space, y, n_moves=80, beta=0.4, generator=g)
    assert 0.05 < acc < 1.0
    grid = torch.linspace(-15, 15, 300_001, dtype=F64)
    ref_mean, ref_var = m.cpu().clone(), v.cpu().clone()
    for o, i in enumerate((0, 2)):
        logp = (
            -0.5 * (grid - m[i].cpu()) ** 2 / v[i].cpu()
            - 0.5 * (y[o].cpu() - torch.atan(grid)) ** 2 / r
        )
        w = torch.softmax(logp, 0)
        ref_mean[i] = (w * grid).sum()
        ref_var[i] = (w * (grid - ref_mean[i]) ** 2).sum()
    xm, xv = x.mean(0).cpu(), x.var(0).cpu()
    assert bool(((xm - ref_mean).abs() < K_SE * (ref_var / n).sqrt()).all()), (xm, ref_mean)
    # var of a sample variance: ~ 2 var^2 / n (Gaussian); the targets are close to Gaussian
    # here (checked: kurtosis within 10 %), 4.5 s.e. with a 1.5x margin for non-normality
    assert bool(((xv - ref_var).abs() < 1.5 * K_SE * ref_var * math.sqrt(2 / n)).all()), (
        xv,
        ref_var,
    )


def test_pcn_moves_bad_input():
    space = ObsSpace(Observation(Identity(), GaussianNoise(std=1.0)), (2,), F64, "cpu")
    kern = GaussianKernel(torch.zeros(3, 2, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(InputError, match="move_beta"):
        pcn_moves(kern.mean, kern, space, torch.zeros(2, dtype=F64), 1, beta=0.0)
    with pytest.raises(InputError, match="moves"):
        pcn_moves(kern.mean, kern, space, torch.zeros(2, dtype=F64), -1)
    x, acc = pcn_moves(kern.mean, kern, space, torch.zeros(2, dtype=F64), 0)
    assert torch.equal(x, kern.mean) and math.isnan(acc)


@pytest.mark.slow
@pytest.mark.parametrize("d, operator", [(2, Identity()), (10, Subset(every=2))])
def test_global_dpf_with_moves_matches_kalman(d, operator):
    """The global dpf with exact moves at the last step: posterior mean and variance within
    MC error of the Kalman filter at every cycle, evidence unbiased in ``exp`` (the moves
    leave the weights unchanged). Same setup and tolerances as ``test_dpf_matches_kalman``."""
    assert_matches_kalman(DiffusionParticleFilter(moves=3, move_beta=0.7), d, operator)


def test_hybrid_with_infinite_radius_matches_kalman():
    """Hybrid at ``radius = inf``: the particle part (exact for ``g^{1-gamma}``) followed by
    an ETKF with ``R / gamma`` -- exact for a linear-Gaussian model up to O(1/N), so the
    posterior mean/variance must match Kalman within MC error (tolerances as in
    ``test_dpf_matches_kalman``); a hybrid that double-counted the observation (``R``
    in both parts) fails the same check."""
    world, obs, ys, kf, x0 = linear_case(2, Identity(), std=0.5)
    filt = LocalDiffusionParticleFilter(radius=math.inf, hybrid=0.5)
    means, var, _ = _run(world, filt, obs, ys, x0, R=16, N=400)
    _within(means, kf.means)
    _within(var, torch.diagonal(kf.covs, dim1=1, dim2=2))
    double = LocalDiffusionParticleFilter(radius=math.inf, hybrid=0.5)
    double._split_obs = lambda o: (o, Observation(o.operator, GaussianNoise(std=0.5)))
    _, var_d, _ = _run(world, double, obs, ys, x0, R=16, N=400)
    with pytest.raises(AssertionError):
        _within(var_d, torch.diagonal(kf.covs, dim1=1, dim2=2))


def test_hybrid_zero_and_moves_zero_are_the_plain_local_filter():
    d = 12
    world = DiffusionLinearGaussian(0.9 * torch.eye(d, dtype=F64), None,
                                    0.3 * torch.eye(d, dtype=F64), steps=2, q=0.1)  # fmt: skip
    obs = Observation(Arctan(Subset(every=3)), GaussianNoise(std=0.1))
    y = torch.tensor([0.5, -0.2, 0.1, 1.0], dtype=F64)
    x0 = torch.randn(32, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    outs = []
    for filt in (make_dpf(world, radius=2.0), make_dpf(world, radius=2.0, hybrid=0.0, moves=0)):
        ens, _ = filt.cycle(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(3))
        outs.append(ens.x)
    assert torch.equal(outs[0], outs[1])
    # with moves and the hybrid the cycle runs and reports its diagnostics
    filt = make_dpf(world, radius=2.0, hybrid=0.3, moves=2)
    ens, info = filt.cycle(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(3))
    assert 0.0 < info["move_accept"] <= 1.0 and info["hybrid"] == 0.3
    assert ens.x.shape == x0.shape and bool(torch.isfinite(ens.x).all())
    assert not torch.equal(ens.x, outs[0])


def test_bad_options_raise():
    with pytest.raises(InputError, match="localised"):
        make_dpf(None, hybrid=0.5)
    with pytest.raises(InputError, match="hybrid"):
        make_dpf(None, radius=2.0, hybrid=1.0)
    with pytest.raises(InputError, match="moves"):
        make_dpf(None, moves=-1)
    with pytest.raises(InputError, match="move_beta"):
        make_dpf(None, moves=1, move_beta=1.5)
    filt = make_dpf(None, radius=2.0, hybrid=0.5)
    t_obs = Observation(Identity(), StudentTNoise(scale=1.0, df=4.0))
    with pytest.raises(InputError, match="Gaussian"):
        filt._split_obs(t_obs)


def test_cli_flags_reach_the_filter():
    """``assim assimilate --moves K --hybrid G`` are parsed into the dpf's options."""
    import argparse

    from assim.commands.assimilate import add_arguments, make_method, method_options

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--obs", "o.nc", "--world", "l96", "--method", "dpf", "--members", "8"]
    base += ["--out", "a.nc", "--radius", "3"]
    filt = make_method(
        "dpf", method_options(p.parse_args([*base, "--moves", "2", "--hybrid", "0.4"]))
    )
    assert filt.moves == 2 and filt.hybrid == 0.4 and filt._kalman.radius == 3.0
    off = make_method("dpf", method_options(p.parse_args(base)))
    assert off.moves == 0 and off.hybrid == 0.0 and off._kalman is None
