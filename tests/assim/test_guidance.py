"""Guidance: closed forms, exact identities and the zero-guidance equivalence."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import MultivariateNormal

from assim.errors import InputError
from assim.guidance import (
    Guide,
    ObsSpace,
    dps_shift,
    gaussian_twist,
    inpaint,
    tweedie_slope,
    twist_gradient,
    twisted_gaussian_proposal,
)
from assim.obs import Arctan, GaussianNoise, Linear, Observation, Operator, StudentTNoise, Subset
from models.diffusion.kernel import GaussianKernel
from models.worlds.diffusion_lg import DiffusionLinearGaussian

F64 = torch.float64


def _world(d: int = 3, **kw) -> DiffusionLinearGaussian:
    return DiffusionLinearGaussian(0.9 * torch.eye(d, dtype=F64), None,
                                   0.4 * torch.eye(d, dtype=F64), steps=3, **kw)  # fmt: skip


def test_zero_guidance_reproduces_the_unguided_sampler_bitwise(device):
    world = _world(4, q=0.1).to(device)
    cond = torch.randn(8, 4, dtype=F64, device=device)
    obs = Observation(Subset(every=2), GaussianNoise(std=0.3))
    y = torch.tensor([0.2, -0.1], dtype=F64, device=device)
    space = ObsSpace(obs, (4,), F64, device)

    def run(guide: Guide | None) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(11)
        chain = world.transition_sampler(cond)
        x = chain.init(g)
        if guide is not None:
            guide.start(x)
        for j in range(len(chain.times) - 1):
            x = chain.kernel(x, j).sample(g) if guide is None else guide.step(x, j, g)[0]
        return x

    plain = run(None)
    assert torch.equal(run(Guide(world.transition_sampler(cond), None, None)), plain)
    assert torch.equal(run(Guide(world.transition_sampler(cond), space, y, twist="none")), plain)
    assert torch.equal(world.step(cond, torch.Generator(device=device).manual_seed(11)), plain)
    # guidance does change the samples (so the equalities above can fail)
    assert not torch.equal(run(Guide(world.transition_sampler(cond), space, y)), plain)
    kern = GaussianKernel(plain, torch.ones((), dtype=F64, device=device))
    assert dps_shift(kern, torch.ones_like(plain), 0.0) is kern


def _explicit_posterior(m, v, G, S, r):
    """Closed form of ``N(x; m, diag v) N(r; G (x - m), S)`` for one particle."""
    V = torch.diag(v)
    C = G @ V @ G.T + S
    K = V @ G.T @ torch.linalg.inv(C)
    return m + K @ r, V - K @ G @ V, C


@pytest.mark.parametrize("dense", [True, False])
def test_twisted_proposal_matches_the_closed_form(dense):
    d = 3
    if dense:  # overlapping rows and a full R: the dense observation-space path
        H = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=F64)
        obs = Observation(Linear(H), GaussianNoise(R=torch.tensor([[0.3, 0.1], [0.1, 0.2]])))
    else:
        H = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
        obs = Observation(Subset([0, 2]), GaussianNoise(std=torch.tensor([0.5, 0.4])))
    space = ObsSpace(obs, (d,), F64, "cpu")
    assert space.diagonal is not dense
    m = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    v = torch.tensor([0.4, 0.2, 0.3], dtype=F64)
    kappa = torch.tensor([0.8, 0.5, 0.9], dtype=F64)
    u = torch.tensor([0.1, 0.05, 0.2], dtype=F64)
    x_lin = torch.tensor([0.1, 0.0, 0.4], dtype=F64)
    y = torch.tensor([0.7, -0.3], dtype=F64)
    n = 40_000
    kern = GaussianKernel(m.expand(n, d), v.expand(n, d))
    g = torch.Generator().manual_seed(0)
    prop = twisted_gaussian_proposal(kern, space, y, x_lin.expand(n, d), kappa, u, g)
    G = H * kappa
    R = obs.noise.covariance(2).to(F64)
    S = R + H @ torch.diag(u) @ H.T
    r = y - H @ x_lin
    mean, cov, C = _explicit_posterior(m, v, G, S, r)
    # exact identity: log p(x | x_t) + log p_lin(y | x) - log q(x) = log N(r; 0, C)
    x = prop.x[:5]
    log_p = MultivariateNormal(m, torch.diag(v)).log_prob(x)
    log_lin = MultivariateNormal(torch.zeros(2, dtype=F64), S).log_prob(r - (x - m) @ G.T)
    log_q = MultivariateNormal(mean, cov).log_prob(x)
    ref = MultivariateNormal(torch.zeros(2, dtype=F64), C).log_prob(r)
    torch.testing.assert_close(prop.log_norm[:5], ref.expand(5), rtol=0, atol=1e-10)
    torch.testing.assert_close(prop.log_twist_lin[:5], log_lin, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_p + log_lin - log_q, ref.expand(5), rtol=0, atol=1e-10)
    # the draws follow q: mean within 4 s.e. (sqrt(diag cov / n)), covariance within
    # 4 s.e. of a sample covariance (sqrt((C_ii C_jj + C_ij^2) / n))
    se_m = (torch.diagonal(cov) / n).sqrt()
    assert bool(((prop.x.mean(0) - mean).abs() < 4 * se_m).all())
    se_c = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    assert bool(((torch.cov(prop.x.T) - cov).abs() < 4 * se_c).all())


def test_diagonal_fast_path_equals_dense_path_and_per_obs_terms_sum():
    d = 6
    obs = Observation(Arctan(Subset(every=2)), GaussianNoise(std=torch.tensor([0.3, 0.2, 0.4])))
    fast = ObsSpace(obs, (d,), F64, "cpu")
    dense = copy.copy(fast)
    dense.diagonal = False
    g = torch.Generator().manual_seed(1)
    kern = GaussianKernel(torch.randn(7, d, generator=g, dtype=F64), torch.rand(d, dtype=F64))
    x_lin = torch.randn(7, d, generator=g, dtype=F64)
    y = torch.tensor([0.4, -0.5, 0.1], dtype=F64)
    u, kappa = 0.2 * torch.ones(d, dtype=F64), 0.7 * torch.ones(d, dtype=F64)
    out = []
    for sp, per in ((fast, False), (dense, False), (fast, True)):
        gen = torch.Generator().manual_seed(5)
        out.append(twisted_gaussian_proposal(kern, sp, y, x_lin, kappa, u, gen, per_obs=per))
    torch.testing.assert_close(out[1].x, out[0].x, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1].log_norm, out[0].log_norm, rtol=0, atol=1e-10)
    torch.testing.assert_close(out[2].log_norm.sum(1), out[0].log_norm, rtol=0, atol=1e-10)
    tw = gaussian_twist(fast, y, x_lin, u, per_obs=True).sum(1)
    torch.testing.assert_close(tw, gaussian_twist(dense, y, x_lin, u), rtol=0, atol=1e-10)


@pytest.mark.parametrize("noise", [GaussianNoise(std=0.3), StudentTNoise(0.3, df=4.0)])
def test_per_observation_likelihood_sums_to_the_likelihood(noise):
    obs = Observation(Subset(every=2), noise)
    space = ObsSpace(obs, (6,), F64, "cpu")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.tensor([0.1, 0.9, -0.4], dtype=F64)
    per = space.log_likelihood(y, x, per_obs=True)
    assert per.shape == (5, 3)
    torch.testing.assert_close(per.sum(1), obs.log_likelihood(y, x), rtol=1e-12, atol=1e-12)


class _OnlyNoiseVar:
    """A chain that exposes ``noise_var`` but no ``denoise_slope`` (like a learned world)."""

    def __init__(self, chain):
        self.times, self.noise_var, self.denoise_var = (
            chain.times,
            chain.noise_var,
            chain.denoise_var,
        )


def test_tweedie_slope_is_the_jacobian_of_the_exact_denoiser():
    """For a diagonal Gaussian model ``dE[x_f | x_t]/dx_t = Var[x_f | x_t] / (nu_t^2 - nu_f^2)``
    exactly (the forward-process oracle, ``exact_twist=False``)."""
    world = _world(3, q=0.3, exact_twist=False)
    chain = world.transition_sampler(torch.randn(1, 3, dtype=F64))
    for j in range(len(chain.times) - 1):
        jac = torch.autograd.functional.jacobian(
            lambda x, j=j: chain.denoise(x.unsqueeze(0), j)[0], torch.zeros(3, dtype=F64)
        )
        kappa = tweedie_slope(_OnlyNoiseVar(chain), j, chain.denoise_var(j))
        torch.testing.assert_close(kappa, torch.diagonal(jac), rtol=1e-10, atol=1e-12)
    assert tweedie_slope(SimpleNamespace(times=chain.times), 0, 1.0) is None


def test_twist_gradient_matches_finite_differences_and_shift():
    world = _world(3, q=0.2, exact_twist=False)
    chain = world.transition_sampler(torch.randn(4, 3, dtype=F64))
    obs = Observation(Arctan(), GaussianNoise(std=0.5))
    space = ObsSpace(obs, (3,), F64, "cpu")
    y = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)

    def f(z):
        return gaussian_twist(space, y, chain.denoise(z, 1), chain.denoise_var(1))

    val, grad = twist_gradient(x, f)
    torch.testing.assert_close(val, f(x))
    h = 1e-6
    for i in range(3):
        e = torch.zeros(3, dtype=F64)
        e[i] = h
        fd = (f(x + e) - f(x - e)) / (2 * h)
        torch.testing.assert_close(grad[:, i], fd, rtol=1e-6, atol=1e-8)
    kern = GaussianKernel(x, torch.full((3,), 0.5, dtype=F64))
    torch.testing.assert_close(dps_shift(kern, grad, 2.0).mean, x + 2.0 * 0.5 * grad)


def test_inpaint_noises_observed_entries_only():
    n, shape = 20_000, (4, 5)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    values = torch.arange(20, dtype=F64).reshape(shape)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    out = inpaint(x, values, mask, 0.8, 0.5, g)
    assert torch.equal(out[:, ~mask], x[:, ~mask])
    # mean alpha*value within 4 s.e. (sigma / sqrt(n)); std within 4 s.e. (sigma/sqrt(2n))
    obs = out[:, mask]
    assert bool(((obs.mean(0) - 0.8 * values[mask]).abs() < 4 * 0.5 / math.sqrt(n)).all())
    assert bool(((obs.std(0) - 0.5).abs() < 4 * 0.5 / math.sqrt(2 * n)).all())
    state = g.get_state()
    assert inpaint(x, values, torch.zeros(shape, dtype=torch.bool), 0.8, 0.5, g) is x
    assert torch.equal(g.get_state(), state)  # an empty mask draws nothing
    with pytest.raises(InputError, match="mask"):
        inpaint(x, values, torch.zeros(3, dtype=torch.bool), 1.0, 0.1)


def test_bad_inputs_raise_clear_errors():
    class Weird(Operator):
        linear = False
        spec = "weird"

        def _apply(self, x):
            return x.reshape(x.shape[0], -1) ** 2

    with pytest.raises(InputError, match="linear or pointwise"):
        ObsSpace(Observation(Weird(), GaussianNoise(std=1.0)), (3,), F64, "cpu")
    full = Observation(Linear(torch.ones(2, 3, dtype=F64)), GaussianNoise(std=1.0))
    space = ObsSpace(full, (3,), F64, "cpu")
    with pytest.raises(InputError, match="per-observation"):
        gaussian_twist(space, torch.zeros(2, dtype=F64), torch.zeros(1, 3, dtype=F64), 1.0, True)
    chain = _world(3).transition_sampler(torch.zeros(2, 3, dtype=F64))
    with pytest.raises(InputError, match="twist"):
        Guide(chain, space, torch.zeros(2, dtype=F64), twist="magic")


def test_arctan_twist_and_proposal_are_the_ekf_linearisation():
    """Nonlinear ``h = arctan(H x)``: the twist is ``N(y; h(x_hat), R + diag(a) H diag(u) H^T
    diag(a))`` with ``a = 1 / (1 + (H x_hat)^2)`` (EKF linearisation at the denoised state)
    and the proposal is the exact Gaussian posterior of the kernel under the linearised
    operator ``G = diag(a) H diag(kappa)`` around ``x_lin``."""
    d = 4
    obs = Observation(Arctan(Subset(every=2)), GaussianNoise(std=torch.tensor([0.3, 0.2])))
    space = ObsSpace(obs, (d,), F64, "cpu")
    H = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=F64)
    x_lin = torch.tensor([0.8, -0.1, -1.5, 0.3], dtype=F64)
    a = 1.0 / (1.0 + (H @ x_lin) ** 2)
    u = torch.tensor([0.1, 0.2, 0.3, 0.05], dtype=F64)
    R = obs.noise.covariance(2).to(F64)
    y = torch.tensor([0.5, -0.9], dtype=F64)
    S = R + torch.diag(a) @ H @ torch.diag(u) @ H.T @ torch.diag(a)
    r = y - torch.arctan(H @ x_lin)
    twist = gaussian_twist(space, y, x_lin[None], u)
    ref = MultivariateNormal(torch.zeros(2, dtype=F64), S).log_prob(r)
    torch.testing.assert_close(twist, ref[None], rtol=0, atol=1e-12)
    m = torch.tensor([0.6, 0.1, -1.2, 0.0], dtype=F64)
    v = torch.tensor([0.3, 0.2, 0.1, 0.4], dtype=F64)
    kappa = torch.tensor([0.9, 0.5, 0.7, 0.6], dtype=F64)
    kern = GaussianKernel(m.expand(3, d), v.expand(3, d))
    prop = twisted_gaussian_proposal(kern, space, y, x_lin.expand(3, d), kappa, u,
                                     torch.Generator().manual_seed(0))  # fmt: skip
    G = torch.diag(a) @ H @ torch.diag(kappa)
    mean, cov, C = _explicit_posterior(m, v, G, S, r)
    log_p = MultivariateNormal(m, torch.diag(v)).log_prob(prop.x)
    log_lin = MultivariateNormal(torch.zeros(2, dtype=F64), S).log_prob(r - (prop.x - m) @ G.T)
    log_q = MultivariateNormal(mean, cov).log_prob(prop.x)
    norm = MultivariateNormal(torch.zeros(2, dtype=F64), C).log_prob(r)
    torch.testing.assert_close(prop.log_norm, norm.expand(3), rtol=0, atol=1e-10)
    torch.testing.assert_close(prop.log_twist_lin, log_lin, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_p + log_lin - log_q, norm.expand(3), rtol=0, atol=1e-10)
