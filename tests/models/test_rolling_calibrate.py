"""``Rolling.calibrate``: the twist variance of the Markov chain measured on held-out
pairs, and loading of checkpoints written before it existed.

With the exact denoiser of the counting process (``tests/models/test_rolling.py``; it
counts in normalised units, so ``E[x_{k+1} | window] = x_k + s`` whatever the noisy
window), ``denoise`` is exact at every index, so pairs ``(x_k, x_k + s + delta)`` give
``cal_mse[j] = mean(delta^2 / s^2)`` in closed form at every ``j``, and
``denoise_var(j) = s^2 cal_mse[j] + q^2``.
"""

from __future__ import annotations

import math

import torch

from models.checkpoint import load, save
from tests.models.test_rolling import Counting, N, _world


def test_calibrate_matches_the_closed_form(device, gen, monkeypatch):
    world = _world(device)
    world.state_std.fill_(2.0)
    monkeypatch.setattr(world, "denoise_window", Counting())
    x = torch.randn(64, N, generator=gen(0), device="cpu").to(device)
    delta = 0.3 * torch.randn(64, N, generator=gen(1), device="cpu").to(device)
    mse = world.calibrate(x.unsqueeze(1), x + 2.0 + delta)
    want = float((delta / 2.0).pow(2).mean())
    n = len(world.levels(device)) - 1
    torch.testing.assert_close(mse[:n].double().cpu(), torch.full((n,), want, dtype=torch.float64))
    world.q = 0.1
    chain = world.transition_sampler(x)
    for j in range(n):
        torch.testing.assert_close(
            chain.denoise_var(j), torch.full_like(chain.s, 4.0 * want + 0.01), rtol=1e-5, atol=0
        )
    torch.testing.assert_close(chain.denoise_var(n), torch.full_like(chain.s, 0.01))


def test_uncalibrated_world_uses_tweedie(device):
    world = _world(device)
    chain = world.transition_sampler(torch.zeros(2, N, device=device))
    j = 1
    r2, sd2 = chain.ratio[j] ** 2, world.sigma_data**2
    torch.testing.assert_close(chain.denoise_var(j), chain.s**2 * r2 * sd2 / (r2 + sd2))


def test_checkpoints_with_and_without_calibration_load(tmp_path, gen):
    world = _world("cpu")
    x = torch.randn(8, N, generator=gen(2))
    world.calibrate(x.unsqueeze(1), x + 1.0)
    path = save(world, tmp_path / "rolling.pt", {})
    back = load(path)
    torch.testing.assert_close(back.cal_mse, world.cal_mse)
    assert (path.stat().st_mode & 0o777) == 0o644  # shareable, not mkstemp's 0600
    # an older checkpoint (no cal_mse buffer) loads uncalibrated
    payload = torch.load(path, weights_only=False)
    del payload["state_dict"]["cal_mse"]
    torch.save(payload, tmp_path / "old.pt")
    old = load(tmp_path / "old.pt")
    assert all(math.isnan(v) for v in old.cal_mse.tolist())
