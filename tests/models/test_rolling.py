"""Rolling diffusion: noise-level schedule and window bookkeeping.

Bookkeeping is checked with an exact denoiser of a deterministic "counting" process
``x_{k+1} = x_k + 1``: given the clean context frame ``x_k``, frame ``w`` of the window
is ``x_k + w + 1`` with certainty, so ``E[z_0 | z_t] = ctx + w + 1`` whatever ``z_t``.
A correct rolling sampler then emits ``x_0 + 1, x_0 + 2, ...``: one frame per step, in
order, with the context advanced by exactly one frame (up to the final DDPM step's
noise ``sigma_min = 0.002``).
"""

from __future__ import annotations

import pytest
import torch

from models.worlds.rolling import Rolling, RollingSpec, init_levels, rolling_levels

W, N = 3, 6


def _world(device, **kw) -> Rolling:
    torch.manual_seed(0)
    spec = RollingSpec(
        state_shape=(N,),
        dt=0.1,
        window=W,
        init_steps=4,
        shift_steps=2,
        backbone_kwargs=dict(width=8, depth=1),
        **kw,
    )
    return Rolling(spec).to(device).eval()


class Counting:
    """Exact denoiser of the counting process; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z_t, t, ctx):
        self.calls += 1
        w = torch.arange(1, W + 1, dtype=z_t.dtype, device=z_t.device)
        return ctx.unsqueeze(1) + w.reshape(1, W, *([1] * (z_t.dim() - 2)))


def test_noise_levels_follow_the_schedule():
    tau = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    w = torch.arange(W, dtype=torch.float64)
    torch.testing.assert_close(rolling_levels(tau, W), (w + tau[:, None]) / W)
    torch.testing.assert_close(init_levels(tau, W)[0], torch.ones(W, dtype=torch.float64))
    torch.testing.assert_close(init_levels(tau, W)[-1], (w + 1) / W)
    lv = _world("cpu").levels()
    assert lv.shape == (4 + 2 + 1, W)
    torch.testing.assert_close(lv[0], torch.ones(W, dtype=torch.float64))  # pure noise
    torch.testing.assert_close(lv[4], (w + 1) / W)  # end of init = rolling start
    torch.testing.assert_close(lv[-1], w / W)  # frame 0 clean, the rest one level down
    assert bool((lv[1:] <= lv[:-1]).all())  # no frame ever gets noisier
    assert bool((lv[1:, 0] < lv[:-1, 0]).all())  # frame 0 strictly denoised


def test_rollout_emits_one_frame_per_step(device, gen, monkeypatch):
    world = _world(device)
    oracle = Counting()
    monkeypatch.setattr(world, "denoise_window", oracle)
    x0 = torch.zeros(N, device=device)
    fc, levels = world.rollout(x0, 5, members=4, generator=gen(0, device), return_levels=True)
    assert fc.shape == (4, 5, N)
    # steps 1..5 emit x_0 + 1 .. x_0 + 5 (sd of the last DDPM step: s * sigma_min = 0.002)
    want = torch.arange(1, 6, dtype=fc.dtype, device=device)[None, :, None].expand_as(fc)
    torch.testing.assert_close(fc, want, rtol=0, atol=0.02)
    # every step walks the rolling levels (w+1)/W -> w/W in shift_steps steps
    w = torch.arange(W, dtype=torch.float64, device=device)
    assert levels.shape == (5, 3, W)
    torch.testing.assert_close(levels[:, 0], ((w + 1) / W).expand(5, W))
    torch.testing.assert_close(levels[:, -1], (w / W).expand(5, W))
    # denoiser calls: init_steps once, then shift_steps per emitted frame
    assert oracle.calls == 4 + 5 * 2


def test_markov_step_chain_is_frame_zero(device, gen, monkeypatch):
    world = _world(device)
    monkeypatch.setattr(world, "denoise_window", Counting())
    x = torch.randn(3, N, generator=gen(1), device="cpu").to(device)
    chain = world.transition_sampler(x)
    torch.testing.assert_close(chain.times, world.levels(device)[:, 0])
    xt = chain.init(gen(2, device))
    for j in range(len(chain.times) - 1):
        xt = chain.kernel(xt, j).sample(gen(3 + j, device))
    torch.testing.assert_close(xt, x + 1, rtol=0, atol=0.02)
    # kernels need the window state in order; a fresh chain cannot jump to j > 0
    with pytest.raises(ValueError, match="reindex"):
        world.transition_sampler(x).kernel(x, 2)


def test_reindex_follows_resampled_particles(gen):
    world = _world("cpu")
    x = torch.randn(3, N, generator=gen(4))
    a, b = world.transition_sampler(x), world.transition_sampler(x)
    xa, xb = a.init(gen(5)), b.init(gen(5))
    idx = torch.tensor([2, 0, 0])
    b.reindex(idx)
    ka, kb = a.kernel(xa, 0), b.kernel(xb[idx], 0)
    torch.testing.assert_close(kb.mean, ka.mean[idx])
    torch.testing.assert_close(b.hidden[1], a.hidden[1][idx])


def test_training_loss_rejects_wrong_window():
    with pytest.raises(ValueError, match="windows of 4 states"):
        _world("cpu").training_loss(torch.zeros(2, 2, N), torch.zeros(2, N))


@pytest.mark.slow  # Lightning start-up (~10 s on the first call)
@pytest.mark.parametrize(
    "kind,world_kwargs,backbone",
    [
        ("dyffusion", {"horizon": 2}, "resnet1d"),
        ("rolling", {"window": 2, "init_steps": 2}, "resnet1d"),
        ("function_space", {"lengthscale": 1.5}, "fno"),
    ],
)
def test_world_models_ii_train_and_load(kind, world_kwargs, backbone, tmp_path, gen):
    """``train_world(world=kind)`` (the ``assim train --world`` path) writes a checkpoint
    that ``models.load`` rebuilds into the same world (same draws from the same seed)."""
    import numpy as np
    import xarray as xr

    import models
    from models.train import TrainConfig, train_world

    traj = torch.randn(80, 8, generator=gen(0)).cumsum(0) * 0.1
    da = xr.DataArray(
        traj.numpy(), dims=("time", "x"), coords={"time": np.arange(80) * 0.05}, name="u"
    )
    cfg = TrainConfig(
        out=str(tmp_path / "w.pt"),
        world=kind,
        world_kwargs=world_kwargs,
        backbone=backbone,
        backbone_kwargs=dict(width=8, depth=1),
        steps=3,
        batch_size=16,
        progress=False,
        accelerator="cpu",
        log_dir=str(tmp_path / "logs"),
        val_fraction=0.2,
    )
    world = models.load(train_world(cfg, data=da))
    assert world.kind == kind and world.state_shape == (8,) and world.variable == "u"
    x = traj[:3]
    again = models.load(tmp_path / "w.pt")
    torch.testing.assert_close(world.step(x, gen(1)), again.step(x, gen(1)), rtol=0, atol=0)
    assert world.forecast(x, 2, members=3, generator=gen(2)).shape == (3, 2, 8)
