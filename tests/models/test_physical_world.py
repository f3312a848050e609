"""The ``Physical`` world: protocol, deterministic core, additive model noise."""

from __future__ import annotations

import pytest
import torch

from models.physics import Kolmogorov, Lorenz96
from models.worlds.base import World
from models.worlds.physical import Physical, physical_world


def test_spec_parsing_and_defaults():
    w = physical_world("l96")
    assert isinstance(w, World)
    assert w.state_shape == (40,) and w.dt == 0.05 and w.n_substeps == 1
    assert physical_world("physical:l63").dt == 0.01
    k = physical_world("kolmogorov", n=16, noise_std=0.1)
    assert k.state_shape == (16, 16) and k.dt == pytest.approx(0.2) and k.n_substeps == 20
    assert physical_world("l96", n=10, F=4.0, dt=0.01).simulator.F == 4.0
    with pytest.raises(ValueError, match="unknown system 'l99'.*'kolmogorov', 'l63', 'l96'"):
        physical_world("l99")
    with pytest.raises(ValueError, match="bad simulator parameter"):
        physical_world("l63", n=3)


def test_noise_free_step_equals_substepped_simulator(device):
    sim = Kolmogorov(n=16, re=100.0)
    w = Physical(sim, dt=0.1, n_substeps=4)
    x = sim.random_state(2, torch.Generator().manual_seed(0), torch.float64, device)
    ref = x
    for _ in range(4):
        ref = sim.step(ref, 0.025)
    torch.testing.assert_close(w.step(x), ref, rtol=0, atol=0)


def test_forecast_shapes_and_replication(device):
    w = physical_world("l96", n=8)
    x0 = torch.full((8,), 8.0, dtype=torch.float64, device=device)
    x0[0] += 0.01
    f = w.forecast(x0, n_steps=5, members=3)
    assert f.shape == (3, 5, 8) and f.device.type == device.type
    # deterministic world: all members identical and equal to repeated steps
    torch.testing.assert_close(f[0], f[2], rtol=0, atol=0)
    x = x0[None]
    for k in range(5):
        x = w.step(x)
        torch.testing.assert_close(f[:, k], x.expand(3, 8), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x0 must be \(8,\) or \(3, 8\)"):
        w.forecast(torch.zeros(2, 8), 2, members=3)


def test_model_noise_is_gaussian_with_the_given_std(device):
    # step(x) - M(x) must be N(0, s^2) per element. With n = 20000*8 = 160000 draws the
    # sample std has relative standard error 1/sqrt(2n) ~ 0.0018 and the mean has
    # standard error s/sqrt(n) = 0.00125; tolerances are 5 standard errors.
    s = 0.5
    world = Physical(Lorenz96(n=8), dt=0.05, noise_std=s)
    x = Lorenz96(n=8).random_state(20000, torch.Generator().manual_seed(1), torch.float64, device)
    eta = world.step(x, torch.Generator().manual_seed(2)) - world.deterministic_step(x)
    assert abs(float(eta.mean())) < 5 * s / 400
    assert abs(float(eta.std()) / s - 1) < 5 * 0.0018
    # reproducible with the same seed, different with another
    a = world.step(x[:4], torch.Generator().manual_seed(3))
    b = world.step(x[:4], torch.Generator().manual_seed(3))
    c = world.step(x[:4], torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_per_variable_noise_std(device):
    std = torch.tensor([0.0, 1.0, 0.0, 2.0])
    world = Physical(Lorenz96(n=4), dt=0.05, noise_std=std)
    x = torch.zeros(5000, 4, dtype=torch.float64, device=device)
    eta = world.step(x, torch.Generator().manual_seed(5)) - world.deterministic_step(x)
    assert float(eta[:, 0].abs().max()) == 0.0 and float(eta[:, 2].abs().max()) == 0.0
    # std error of a sample std from 5000 draws: 1/sqrt(10000) = 1 %; allow 5 %.
    assert abs(float(eta[:, 3].std()) / 2.0 - 1) < 0.05
