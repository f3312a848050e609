"""Model-error and data-step variants of the World-models-II chains used by the dpf:
``DYffusionDataStep`` (the first lead of DYffusion's cold sampler as a one-data-step world)
and ``Rolling.configure(q=...)`` (model error on the last kernel of the Markov chain)."""

from __future__ import annotations

import pytest
import torch

from models.worlds.dyffusion import DYffusion, DYffusionChain, DYffusionDataStep, DYffusionSpec
from models.worlds.rolling import Rolling, RollingSpec


def _tiny(device) -> DYffusion:
    torch.manual_seed(0)
    spec = DYffusionSpec(state_shape=(12,), dt=0.1, horizon=3, backbone="resnet1d",
                         backbone_kwargs=dict(width=8, depth=1), kernel_var=0.02)  # fmt: skip
    world = DYffusion(spec).to(device).eval()
    world.state_mean.fill_(0.5)
    world.state_std.fill_(2.0)
    return world


def test_data_step_chain_is_the_first_lead_of_the_cold_sampler(device, gen):
    """Two code paths: the data-step kernel equals lead 0 -> 1 of ``DYffusionChain``;
    ``q`` adds ``q^2`` to its variance; the twist is the kernel itself (one step)."""
    world = _tiny(device)
    x = torch.randn(5, 12, generator=gen(1, device), device=device)
    ref = DYffusionChain(world, x).kernel(x, 0)
    q = 0.3
    chain = DYffusionDataStep(world, q=q).transition_sampler(x)
    k = chain.kernel(chain.init(), 0)
    torch.testing.assert_close(k.mean, ref.mean)
    torch.testing.assert_close(torch.as_tensor(k.var), torch.as_tensor(ref.var) + q**2)
    torch.testing.assert_close(chain.denoise(x, 0), ref.mean)
    torch.testing.assert_close(chain.denoise_var(0), torch.as_tensor(ref.var) + q**2)
    torch.testing.assert_close(chain.denoise_var(1), torch.full((12,), q**2, device=device))
    assert chain.times.tolist() == [1.0, 0.0]
    # a resampled x_t (other particles) gets its own mean, not the cached one
    x2 = x.flip(0)
    torch.testing.assert_close(chain.kernel(x2, 0).mean, ref.mean.flip(0))
    with pytest.raises(IndexError):
        chain.kernel(x, 1)


def test_data_step_world_samples_have_the_kernel_moments(device, gen):
    """4000 draws of one data step: the sample mean is within 5 standard errors
    (sigma / sqrt(4000)) of the kernel mean, the variance within 5 x sqrt(2/4000)
    relative error of the kernel variance."""
    world = DYffusionDataStep(_tiny(device), q=0.1)
    x = torch.randn(12, generator=gen(2, device), device=device).expand(4000, 12)
    k = world.transition_sampler(x).kernel(x, 0)
    s = world.step(x, gen(3, device))
    var = torch.as_tensor(k.var).expand(12)
    assert ((s.mean(0) - k.mean[0]).abs() < 5 * (var / 4000).sqrt()).all()
    assert ((s.var(0) / var - 1).abs() < 5 * (2 / 4000) ** 0.5).all()
    with pytest.raises(ValueError):
        world.configure(q=-1.0)


def _rolling(device) -> Rolling:
    torch.manual_seed(0)
    spec = RollingSpec(state_shape=(12,), dt=0.05, window=3, init_steps=3, shift_steps=2,
                       backbone="resnet1d", backbone_kwargs=dict(width=8, depth=1))  # fmt: skip
    return Rolling(spec).to(device).eval()


def test_rolling_model_error_widens_only_the_last_kernel(device, gen):
    """Same noise draws with q = 0 and q = 0.2: every kernel mean and every kernel
    variance but the last agree; the last variance and every twist variance gain q^2."""
    world = _rolling(device)
    x = torch.randn(4, 12, generator=gen(1, device), device=device)

    def walk(q):
        world.configure(q=q)
        chain = world.transition_sampler(x)
        xt = chain.init(gen(2, device))
        out = []
        for j in range(len(chain.times) - 1):
            k = chain.kernel(xt, j)
            out.append((k.mean, torch.as_tensor(k.var), chain.denoise_var(j)))
            xt = k.mean  # follow the means: identical inputs for both q
        out.append((None, None, chain.denoise_var(len(chain.times) - 1)))
        return out

    q = 0.2
    a, b = walk(0.0), walk(q)
    last = len(a) - 2
    for j, ((m0, v0, u0), (m1, v1, u1)) in enumerate(zip(a, b, strict=True)):
        if m0 is not None:
            torch.testing.assert_close(m1, m0)
            torch.testing.assert_close(v1, v0 + (q**2 if j == last else 0.0))
        torch.testing.assert_close(u1, u0 + q**2)
    with pytest.raises(ValueError, match="init_steps"):
        world.configure(steps=2)
    with pytest.raises(ValueError):
        world.configure(q=-0.1)


def test_rolling_chain_reindex_per_location(device, gen):
    """A per-location index ``(D, N)`` equal in every row is the global reindex; a random
    one moves grid point ``d`` of particle ``n`` from particle ``idx[d, n]`` in every
    hidden frame, the context and the pre-drawn noise."""
    world = _rolling(device)
    x = torch.randn(5, 12, generator=gen(3, device), device=device)
    ch_a, ch_b, ch_c = (world.transition_sampler(x) for _ in range(3))
    for ch in (ch_a, ch_b, ch_c):
        x1 = ch.kernel(ch.init(gen(4, device)), 0).mean
    glob = torch.tensor([2, 2, 0, 4, 1], device=device)
    ch_a.reindex(glob)
    ch_b.reindex(glob.expand(12, 5))
    for j in ch_a.hidden:
        torch.testing.assert_close(ch_b.hidden[j], ch_a.hidden[j])
    torch.testing.assert_close(ch_b.eps, ch_a.eps)
    torch.testing.assert_close(ch_b.ctx, ch_a.ctx)
    idx = torch.randint(0, 5, (12, 5), generator=gen(5, device), device=device)
    old = {j: h.clone() for j, h in ch_c.hidden.items()}
    eps, ctx = ch_c.eps.clone(), ch_c.ctx.clone()
    ch_c.reindex(idx)
    n, d = torch.meshgrid(torch.arange(5), torch.arange(12), indexing="ij")
    src = idx.T.cpu()
    for j, h in old.items():
        torch.testing.assert_close(ch_c.hidden[j], h[src, :, d].permute(0, 2, 1))
    torch.testing.assert_close(ch_c.eps, eps[:, src, :, d].permute(2, 0, 3, 1))
    torch.testing.assert_close(ch_c.ctx, ctx[src, d])
    assert x1.shape == x.shape


def test_dyffusion_var_scale_scales_every_kernel_variance_exactly(device, gen):
    """``set_var_scale(c)``: every kernel of the cold-sampling chain keeps its mean and
    has exactly ``c`` times the variance of the unscaled world (two code paths: the
    scaled world vs ``c x`` the default one); the data-step chain's variance is
    ``c s^2 v_0 + q^2``; the twist variance before the forecaster MSE is known is the
    scaled sum of the remaining kernels; ``c <= 0`` or non-finite is rejected."""
    world = _tiny(device)
    x = torch.randn(5, 12, generator=gen(4, device), device=device)
    ref = DYffusionChain(world, x)
    refs = [ref.kernel(x, j) for j in range(world.horizon)]
    ref_twist = [ref.denoise_var(j) for j in range(world.horizon)]
    c = 0.3
    chain = DYffusionChain(world.set_var_scale(c), x)
    for j, r in enumerate(refs):
        k = chain.kernel(x, j)
        torch.testing.assert_close(k.mean, r.mean)
        torch.testing.assert_close(torch.as_tensor(k.var), c * torch.as_tensor(r.var))
        torch.testing.assert_close(chain.denoise_var(j), c * ref_twist[j])
    q = 0.2
    data = DYffusionDataStep(world, q=q).transition_sampler(x).kernel(x, 0)
    torch.testing.assert_close(torch.as_tensor(data.var), c * torch.as_tensor(refs[0].var) + q**2)
    # sampling uses the scaled variance: with the same generator, the path deviates from
    # the (deterministic) kernel mean by exactly sqrt(c) times the unscaled deviation
    a = DYffusionChain(world.set_var_scale(1.0), x).kernel(x, 0)
    s1 = a.sample(gen(5, device))
    sc = DYffusionChain(world.set_var_scale(c), x).kernel(x, 0).sample(gen(5, device))
    torch.testing.assert_close(sc - a.mean, c**0.5 * (s1 - a.mean))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            world.set_var_scale(bad)
    assert world.var_scale == c
