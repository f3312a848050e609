"""Samplers against the exact Gaussian oracle, and the kernels they expose."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion.oracles import GaussianDenoiser, chain_moments
from models.diffusion.samplers import DDIM, DDPM, EulerMaruyama, Heun
from models.diffusion.schedules import EDM, CosineVP, LinearVP

F64 = torch.float64


def gaussian(d: int, device, seed: int = 0, mu_scale: float = 0.5):
    """A full-rank ``N(mu, Sigma)``: ``Sigma = L L^T / d + 0.1 I``."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=F64)
    sigma = L @ L.T / d + 0.1 * torch.eye(d, dtype=F64)
    mu = mu_scale * torch.randn(d, generator=g, dtype=F64)
    return mu.to(device), sigma.to(device)


def mc_z_scores(x, mu, sigma):
    """Largest |error| / MC standard error of the sample mean and covariance.

    s.e.(mean_i) = sqrt(Sigma_ii / N); for Gaussian data
    s.e.(cov_ij) = sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / N) (Isserlis)."""
    n = x.shape[0]
    diag = sigma.diagonal()
    z_mean = (x.mean(0) - mu).abs() / (diag / n).sqrt()
    se_cov = ((torch.outer(diag, diag) + sigma**2) / n).sqrt()
    z_cov = (torch.cov(x.T) - sigma).abs() / se_cov
    return z_mean.max().item(), z_cov.max().item()


def mc_z_scores_exact(m, c, mu, sigma, n):
    """Bias of exact moments ``(m, c)`` in units of the MC s.e. of ``n`` samples."""
    diag = sigma.diagonal()
    se_cov = ((torch.outer(diag, diag) + sigma**2) / n).sqrt()
    return (m - mu).abs().div((diag / n).sqrt()).max().item(), (
        (c - sigma).abs() / se_cov
    ).max().item()


# (sampler factory, steps). Tolerance: the sample error is bias + MC error. The steps are
# chosen so that the exact discretisation bias (computed by ``chain_moments`` and asserted
# in the test) is below 1 MC s.e. at N = 4096; the MC part is then ~N(0, 1) per entry and
# the test fails only if some |z_MC| > 3 (P ~ 0.3% per entry; the fixed seeds make the
# outcome deterministic). Power: inflating every DDPM step's variance by 10% gives
# max z_cov ~ 5-6 at d = 2 and 16 and fails (checked by hand).
CASES = {
    "ddpm": (lambda den: DDPM(den), 256),
    "ddim0": (lambda den: DDIM(den, eta=0.0), 256),
    "ddim1": (lambda den: DDIM(den, eta=1.0), 256),
    "euler_maruyama": (lambda den: EulerMaruyama(den), 256),
    "heun": (lambda den: Heun(den), 128),
}


def _reproduces(name, d, device, gen):
    mu, sigma = gaussian(d, device)
    den = GaussianDenoiser(mu, sigma, CosineVP())
    make, steps = CASES[name]
    sampler = make(den)
    n = 4096
    bias = mc_z_scores_exact(*chain_moments(sampler, d, steps), mu, sigma, n)
    assert max(bias) < 1.0, bias
    x = sampler.sample((n, d), steps=steps, generator=gen(1, device))
    assert x.shape == (n, d) and x.dtype == F64 and x.device.type == device.type
    z_mean, z_cov = mc_z_scores(x, mu, sigma)
    assert z_mean < 4 and z_cov < 4, (z_mean, z_cov)


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_reproduces_gaussian_d2(name, device, gen):
    _reproduces(name, 2, device, gen)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sampler_reproduces_gaussian_d16(name, device, gen):
    _reproduces(name, 16, device, gen)


@pytest.mark.parametrize("schedule", [CosineVP(), LinearVP(), EDM()], ids=repr)
@pytest.mark.parametrize("name", list(CASES))
def test_exact_chain_moments_converge(schedule, name):
    """Without MC noise: the law of the discretised chain tends to N(0, Sigma) as steps grow
    (mu = 0 so that the prior N(0, prior_std^2) matches the marginal's mean exactly)."""
    d = 4
    _, sigma = gaussian(d, "cpu")
    mu = torch.zeros(d, dtype=F64)
    sampler = CASES[name][0](GaussianDenoiser(mu, sigma, schedule))
    errs = []
    for steps in (32, 512):
        m, c = chain_moments(sampler, d, steps)
        errs.append((m - mu).abs().max().item() + (c - sigma).abs().max().item())
    # first-order samplers: 16x more steps -> error / ~16; demand at least / 4
    assert errs[1] < 0.25 * errs[0] or errs[1] < 1e-6, errs
    assert errs[1] < 0.05, errs


def test_chain_moments_match_monte_carlo(gen):
    """The exact-moments helper and actual sampling agree (8 coarse EM steps, large bias)."""
    mu, sigma = gaussian(3, "cpu", mu_scale=1.0)
    sampler = EulerMaruyama(GaussianDenoiser(mu, sigma, LinearVP()))
    m, c = chain_moments(sampler, 3, 8)
    x = sampler.sample((8192, 3), steps=8, generator=gen(3))
    z_mean, z_cov = mc_z_scores(x, m, c)
    assert z_mean < 4 and z_cov < 4
    assert (c - sigma).abs().max() > 0.05  # the bias is real, so agreement is informative


def test_ddim_eta1_is_ddpm(device, gen):
    """Two code paths: DDIM's (mean, var) with eta = 1 equals the DDPM posterior."""
    mu, sigma = gaussian(5, device)
    for schedule in (CosineVP(), LinearVP(), EDM()):
        den = GaussianDenoiser(mu, sigma, schedule)
        x = torch.randn(7, 5, generator=gen(0, device), dtype=F64, device=device)
        t = torch.rand(7, generator=gen(1, device), dtype=F64, device=device) * 0.9 + 0.1
        for tt, ss in ((t, 0.8 * t), (torch.tensor(0.6, dtype=F64), 0.3)):
            a, b = DDIM(den, eta=1.0).transition(x, tt, ss), DDPM(den).transition(x, tt, ss)
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.var.expand_as(x), b.var.expand_as(x), rtol=1e-10, atol=0)
        half = DDIM(den, eta=0.5).transition(x, 0.6, 0.3)
        assert not torch.allclose(half.var.expand_as(x), b.var.expand_as(x))


@pytest.mark.parametrize("make", [DDPM, lambda d: DDIM(d, 0.7), EulerMaruyama])
def test_kernel_log_prob_matches_its_sampling(make, device, gen):
    """log_prob equals torch.distributions.Normal, and the mean log-density of the kernel's
    own draws equals the negative entropy -sum_i (1 + log(2 pi var_i)) / 2. Per draw,
    log p = const - chi2_D / 2 has sd sqrt(D / 2); tolerance 4 sd / sqrt(n)."""
    d, n = 6, 2000
    mu, sigma = gaussian(d, device)
    sampler = make(GaussianDenoiser(mu, sigma, CosineVP()))
    x_t = torch.randn(n, d, generator=gen(0, device), dtype=F64, device=device)
    k = sampler.transition(x_t, 0.5, 0.45)
    x_s = k.sample(gen(1, device))
    lp = k.log_prob(x_s)
    ref = torch.distributions.Normal(k.mean, k.var.expand_as(k.mean).sqrt()).log_prob(x_s).sum(1)
    torch.testing.assert_close(lp, ref)
    neg_entropy = -0.5 * (1 + torch.log(2 * math.pi * k.var.expand_as(k.mean))).sum(1)
    assert abs((lp - neg_entropy).mean().item()) < 4 * math.sqrt(d / 2) / math.sqrt(n)
    # a kernel with the wrong variance would not pass: doubling var shifts the mean by d/4
    assert abs(d / 4 - d * math.log(2) / 2) > 4 * math.sqrt(d / 2) / math.sqrt(n)


@pytest.mark.parametrize("make", [Heun, lambda d: DDIM(d, 0.0)])
def test_deterministic_kernel_refuses_density(make, device):
    mu, sigma = gaussian(3, device)
    k = make(GaussianDenoiser(mu, sigma, EDM())).transition(
        torch.zeros(4, 3, dtype=F64, device=device), 0.5, 0.4
    )
    assert k.deterministic
    torch.testing.assert_close(k.sample(), k.mean)
    with pytest.raises(ValueError, match="deterministic"):
        k.log_prob(k.mean)


def test_heun_corrector_is_second_order():
    """Heun's error shrinks ~4x per doubling of steps (DDIM(0) = its Euler predictor ~2x)."""
    _, sigma = gaussian(3, "cpu")
    den = GaussianDenoiser(torch.zeros(3, dtype=F64), sigma, EDM())
    err = {}
    for name, s in (("heun", Heun(den)), ("euler", DDIM(den, 0.0))):
        e = [(chain_moments(s, 3, n)[1] - sigma).abs().max().item() for n in (16, 32)]
        err[name] = e[0] / e[1]
    assert err["heun"] > 3.0 and 1.5 < err["euler"] < 3.0, err


def test_stopping_at_a_noise_level():
    """Stopping at t_q = t_of_sigma_ratio(q) leaves x / alpha ~ N(mu, Sigma + q^2 I)."""
    mu, sigma = gaussian(3, "cpu", mu_scale=0.0)
    schedule = CosineVP()
    q = 0.3
    t_q = float(schedule.t_of_sigma_ratio(q))
    sampler = Heun(GaussianDenoiser(mu, sigma, schedule))  # second order: tiny bias
    m, c = chain_moments(sampler, 3, 512, t_min=t_q, return_x0=False)
    alpha, _ = schedule(torch.tensor(t_q, dtype=F64))
    torch.testing.assert_close(
        c / alpha**2, sigma + q**2 * torch.eye(3, dtype=F64), atol=1e-3, rtol=0
    )
    x = DDPM(sampler.denoiser).sample((5, 3), steps=4, t_min=t_q, return_x0=False, dtype=F64)
    assert x.shape == (5, 3)
    # the same run with return_x0 stops at the same place when t_min > 0
    g = torch.Generator().manual_seed(0)
    x1 = DDPM(sampler.denoiser).sample((5, 3), steps=4, t_min=t_q, generator=g, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x2 = DDPM(sampler.denoiser).sample(
        (5, 3), steps=4, t_min=t_q, generator=g, dtype=F64, return_x0=False
    )
    torch.testing.assert_close(x1, x2)


def test_timesteps_and_validation():
    den = GaussianDenoiser(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), CosineVP())
    ts = DDPM(den).timesteps(10, t_min=0.1, t_max=0.9)
    assert ts.shape == (11,) and ts[0] == 0.9 and ts[-1] == 0.1 and torch.all(ts.diff() < 0)
    em = EulerMaruyama(den)
    lam = den.schedule.log_snr(em.timesteps(10))
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(10))
    with pytest.raises(ValueError, match="s < t"):
        DDPM(den).transition(torch.zeros(1, 2, dtype=F64), 0.3, 0.5)
    with pytest.raises(ValueError, match="cond"):
        DDPM(den).sample((4, 2), cond=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="steps"):
        DDPM(den).timesteps(0)
