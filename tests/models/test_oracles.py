"""Oracles against brute-force Gaussian conditioning, and mixture proportions."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from models.diffusion.samplers import DDIM, DDPM
from models.diffusion.schedules import EDM, CosineVP, LinearVP

F64 = torch.float64


def spd(d: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=F64)
    return (L @ L.T / d + 0.2 * torch.eye(d, dtype=F64)).to(device)


@pytest.mark.parametrize("schedule", [CosineVP(), LinearVP(), EDM()], ids=repr)
def test_gaussian_posterior_mean_and_cov_by_direct_solve(schedule, device, gen):
    """x0_hat = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu) by solve,
    Cov = Sigma - alpha^2 Sigma (alpha^2 Sigma + sigma^2 I)^{-1} Sigma; t scalar and (B,)."""
    d, b = 5, 6
    sigma_ = spd(d, 0, device)
    mu = torch.randn(d, generator=gen(1, device), dtype=F64, device=device)
    den = GaussianDenoiser(mu, sigma_, schedule)
    x = 3 * torch.randn(b, d, generator=gen(2, device), dtype=F64, device=device)
    t = torch.rand(b, generator=gen(3, device), dtype=F64, device=device)
    a, s = schedule(t)
    eye = torch.eye(d, dtype=F64, device=device)
    for i in range(b):
        m = a[i] ** 2 * sigma_ + s[i] ** 2 * eye
        expect = mu + a[i] * sigma_ @ torch.linalg.solve(m, x[i] - a[i] * mu)
        torch.testing.assert_close(den(x[i : i + 1], t[i]), expect[None])
        torch.testing.assert_close(den(x, t)[i], expect)
        cov = sigma_ - a[i] ** 2 * sigma_ @ torch.linalg.solve(m, sigma_)
        torch.testing.assert_close(den.posterior_cov(t[i]), cov)
        torch.testing.assert_close(den.posterior_cov(t)[i], cov)
        # score of the marginal N(alpha mu, M): -M^{-1} (x - alpha mu)
        score = -torch.linalg.solve(m, x[i] - a[i] * mu)
        torch.testing.assert_close(den.score(x[i : i + 1], t[i])[0], score)


def test_conditional_linear_gaussian(device, gen):
    """A != None: x0 ~ N(A c + b, Q); matches an unconditional oracle with that mean, and
    DDPM sampling from it reproduces the conditional mean."""
    d, c_dim = 3, 2
    q = spd(d, 4, device)
    A = torch.randn(d, c_dim, generator=gen(0, device), dtype=F64, device=device)
    b = torch.randn(d, generator=gen(1, device), dtype=F64, device=device)
    cond = torch.randn(4, c_dim, generator=gen(2, device), dtype=F64, device=device)
    den = GaussianDenoiser(b, q, CosineVP(), A=A)
    x = torch.randn(4, d, generator=gen(3, device), dtype=F64, device=device)
    for i in range(4):
        ref = GaussianDenoiser(A @ cond[i] + b, q, CosineVP())
        torch.testing.assert_close(den(x, 0.4, cond)[i], ref(x[i : i + 1], 0.4)[0])
    with pytest.raises(ValueError, match="cond"):
        den(x, 0.4)
    # sampling: 2048 particles all with the same cond; mean within 4 s.e. sqrt(Q_ii / n)
    n = 2048
    c1 = cond[:1].expand(n, c_dim)
    xs = DDPM(den).sample((n, d), cond=c1, steps=64, generator=gen(5, device))
    z = (xs.mean(0) - (A @ cond[0] + b)).abs() / (q.diagonal() / n).sqrt()
    assert z.max() < 4, z
    x0 = den.sample_x0(n, gen(6, device), cond=c1)
    assert ((x0.mean(0) - (A @ cond[0] + b)).abs() / (q.diagonal() / n).sqrt()).max() < 4


def test_mixture_matches_brute_force_and_single_component(device, gen):
    k, d, b = 3, 2, 10
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64, device=device)
    mus = torch.randn(k, d, generator=gen(0, device), dtype=F64, device=device) * 3
    sig = torch.stack([spd(d, i, device) for i in range(k)])
    den = GaussianMixtureDenoiser(weights, mus, sig, EDM())
    x = 2 * torch.randn(b, d, generator=gen(1, device), dtype=F64, device=device)
    t = torch.tensor(0.45, dtype=F64, device=device)
    a, s = EDM()(t)
    eye = torch.eye(d, dtype=F64, device=device)
    comps = [
        torch.distributions.MultivariateNormal(a * mus[j], a**2 * sig[j] + s**2 * eye)
        for j in range(k)
    ]
    logp = torch.stack([weights[j].log() + comps[j].log_prob(x) for j in range(k)], 1)
    r = torch.softmax(logp, 1)
    torch.testing.assert_close(den.responsibilities(x, t), r)
    means = torch.stack(
        [GaussianDenoiser(mus[j], sig[j], EDM())(x, t) for j in range(k)], 1
    )  # (B, K, D)
    torch.testing.assert_close(den(x, t), (r[..., None] * means).sum(1))
    one = GaussianMixtureDenoiser(weights[:1], mus[:1], sig[:1], CosineVP())
    torch.testing.assert_close(one(x, 0.3), GaussianDenoiser(mus[0], sig[0], CosineVP())(x, 0.3))


@pytest.mark.parametrize("make", [DDPM, lambda d: DDIM(d, 0.0)])
def test_mixture_sampled_proportions_match_weights(make, gen):
    """Samples are classified by their responsibilities at t = 0. The components are far
    apart, so this recovers the generating component (checked on exact draws: error rate
    < 1e-3). Binomial tolerance: |p_k - w_k| < 4 sqrt(w_k (1 - w_k) / n)."""
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    mus = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=F64)
    sig = torch.stack(
        [0.5 * torch.eye(2, dtype=F64), spd(2, 1, "cpu") * 0.4, 0.3 * torch.eye(2, dtype=F64)]
    )
    den = GaussianMixtureDenoiser(weights, mus, sig, CosineVP())
    n = 4000
    x = make(den).sample((n, 2), steps=64, generator=gen(0))
    labels = den.responsibilities(x, 0.0).argmax(1)
    p = torch.bincount(labels, minlength=3).to(F64) / n
    tol = 4 * (weights * (1 - weights) / n).sqrt()
    assert torch.all((p - weights).abs() < tol), (p, weights, tol)
    x0, true_labels = den.sample_x0(n, gen(1))
    miss = (den.responsibilities(x0, 0.0).argmax(1) != true_labels).to(F64).mean()
    assert miss < 1e-3
    p0 = torch.bincount(true_labels, minlength=3).to(F64) / n
    assert torch.all((p0 - weights).abs() < tol)


def test_oracle_input_validation():
    with pytest.raises(ValueError, match="Sigma"):
        GaussianDenoiser(torch.zeros(3), torch.eye(2), CosineVP())
    with pytest.raises(ValueError, match="symmetric"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), CosineVP())
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianDenoiser(torch.zeros(2), -torch.eye(2), CosineVP())
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser(-torch.ones(2), torch.zeros(2, 1), torch.ones(2, 1, 1), EDM())
    assert math.isclose(
        GaussianDenoiser(torch.zeros(2), 4 * torch.eye(2), EDM()).sigma_data, 2.0, rel_tol=1e-6
    )
