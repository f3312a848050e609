"""ConditionalChain: ``noise_var`` (the chain's state-space noise) and the denoiser memo."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.models.test_conditional import N_GRID, DeltaOracle, small_world


class Counting(nn.Module):
    """Wraps a denoiser and counts its network calls."""

    def __init__(self, den):
        super().__init__()
        self.den, self.schedule, self.sigma_data, self.calls = den, den.schedule, 1.0, 0

    def forward(self, z, t, cond=None):
        self.calls += 1
        return self.den(z, t, cond)


def test_noise_var_is_the_variance_of_the_chain_marginal_around_the_step(device, gen):
    """With an exact delta denoiser the chain's marginal at index j is exactly
    ``x_{k+1} + s r_j eps`` (ancestral DDPM with the exact posterior mean). n = 4000 x 8
    samples: the variance ratio has relative s.e. sqrt(2 / 32000) ~ 0.8 %, tolerance 5 s.e.;
    the init mismatch (prior N(0, 1 + 80^2) vs N(z0, 80^2)) is ~ 1 / 80^2 relative."""
    world = small_world(device, q=0.1, steps=4).double()
    world.denoiser = DeltaOracle(world.denoiser.schedule)
    world.configure()
    x = torch.randn(4000, N_GRID, generator=gen(0), dtype=torch.float64).to(device)
    chain = world.transition_sampler(x)
    target = chain.o + chain.s * 0.5 * chain.cond[:, -1]
    g = gen(1, device)
    xt = chain.init(g)
    n = xt.numel()
    for j in range(len(chain.times)):
        if j > 0:
            xt = chain.kernel(xt, j - 1).sample(g)
        err = (xt - target) / chain.noise_var(j).sqrt()
        assert abs(float(err.pow(2).mean()) - 1) < 5 * math.sqrt(2 / n) + 2 / 80**2, j
    # at the last index the noise is the model error q^2 (uniform s: isotropic)
    torch.testing.assert_close(chain.noise_var(len(chain.times) - 1), chain.q_var)


def test_denoise_then_kernel_runs_the_network_once_and_is_bit_identical(device, gen):
    world = small_world(device)
    x = torch.randn(6, N_GRID, generator=gen(0)).to(device)
    plain = world.transition_sampler(x)
    xt = plain.init(gen(1, device))
    ref_k, ref_d = plain.kernel(xt, 0), plain.denoise(xt, 0)
    world.denoiser = counting = Counting(world.denoiser)
    chain = world.transition_sampler(x)
    d = chain.denoise(xt, 0)
    k = chain.kernel(xt, 0)
    assert counting.calls == 1
    assert torch.equal(d, ref_d) and torch.equal(k.mean, ref_k.mean)
    chain.kernel(xt.clone(), 0)  # equal content: still memoised
    assert counting.calls == 1
    chain.kernel(xt + 1e-3, 0)  # other input: recomputed
    chain.kernel(xt, 1)  # other index: recomputed
    assert counting.calls == 3
    with torch.enable_grad():  # gradients (DPS) bypass the memo
        z = xt.clone().requires_grad_(True)
        chain.denoise(z, 1).sum().backward()
    assert counting.calls == 4 and z.grad is not None
