"""The world-model contract (models/worlds/base.py) that every world kind must pass.

Add a new kind by appending a factory to ``WORLDS`` (and, for diffusion worlds, it is
checked against the ``TransitionChain`` contract automatically).
"""

from __future__ import annotations

import pytest
import torch

from models.worlds import DiffusionWorld, TransitionChain, World
from models.worlds.conditional import Conditional, ConditionalSpec
from models.worlds.linear_gaussian import LinearGaussian
from models.worlds.physical import physical_world


def _physical(device):
    return physical_world("l96", n=12, noise_std=0.1)


def _linear_gaussian(device):
    A = 0.9 * torch.eye(3) + 0.05 * torch.ones(3, 3)
    return LinearGaussian(A, torch.tensor([0.1, 0.0, -0.1]), 0.2 * torch.eye(3), dt=0.5)


def _conditional(device):
    torch.manual_seed(0)
    spec = ConditionalSpec(
        state_shape=(12,),
        dt=0.05,
        backbone="resnet1d",
        backbone_kwargs=dict(width=8, depth=1),
        steps=3,
        q=0.1,
    )
    return Conditional(spec).to(device).eval()


def _world_models_ii(kind):  # DYffusion, Rolling, FunctionSpace (tiny, untrained)
    def make(device):
        from models.worlds import dyffusion, function_space, rolling

        torch.manual_seed(0)
        small = dict(state_shape=(12,), dt=0.05, backbone_kwargs=dict(width=8, depth=1))
        world = {
            "dyffusion": lambda: dyffusion.DYffusion(dyffusion.DYffusionSpec(horizon=3, **small)),
            "rolling": lambda: rolling.Rolling(
                rolling.RollingSpec(window=3, init_steps=3, shift_steps=2, **small)
            ),
            "function_space": lambda: function_space.FunctionSpace(
                function_space.FunctionSpaceSpec(steps=3, q=0.1, **small)
            ),
        }[kind]()
        return world.to(device).eval()

    return make


def _conditional_2d(device):
    """Any grid shape: a 6 x 10 periodic field with a U-Net and the state target."""
    torch.manual_seed(0)
    spec = ConditionalSpec(
        state_shape=(6, 10),
        dt=0.2,
        target="state",
        backbone="unet2d",
        backbone_kwargs=dict(width=8, mults=[1]),
        steps=2,
        dims=("y", "x"),
    )
    return Conditional(spec).to(device).eval()


WORLDS = {
    "physical": _physical,
    "linear_gaussian": _linear_gaussian,
    "conditional": _conditional,
    "conditional_2d": _conditional_2d,
}
WORLDS.update({k: _world_models_ii(k) for k in ("dyffusion", "rolling", "function_space")})


@pytest.fixture(params=sorted(WORLDS))
def world_and_device(request, device):
    return WORLDS[request.param](device), device


def _states(world, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2.0 + torch.randn((n, *world.state_shape), generator=g)).to(device)


def test_world_protocol_shapes_and_dt(world_and_device, gen):
    world, device = world_and_device
    assert isinstance(world, World)
    assert world.dt > 0 and all(n > 0 for n in world.state_shape)
    x = _states(world, 5, device)
    y = world.step(x, gen(1, device))
    assert y.shape == x.shape and y.device == x.device and torch.isfinite(y).all()
    fc = world.forecast(x[0], 3, members=4, generator=gen(2, device))
    assert fc.shape == (4, 3, *world.state_shape)
    fc = world.forecast(x[:4], 2, members=4, generator=gen(2, device))
    assert fc.shape == (4, 2, *world.state_shape)


def test_forecast_is_repeated_step_and_seeded(world_and_device, gen):
    world, device = world_and_device
    x = _states(world, 4, device)
    fc = world.forecast(x, 2, members=4, generator=gen(9, device))
    g = gen(9, device)
    first = world.step(x, g)
    torch.testing.assert_close(fc[:, 0], first, rtol=0, atol=0)
    torch.testing.assert_close(fc[:, 1], world.step(first, g), rtol=0, atol=0)
    again = world.forecast(x, 2, members=4, generator=gen(9, device))
    torch.testing.assert_close(fc, again, rtol=0, atol=0)


def test_wrong_state_shape_is_a_value_error(world_and_device, request):
    world, device = world_and_device
    bad = torch.zeros((2, *(n + 1 for n in world.state_shape)), device=device)
    with pytest.raises(ValueError):
        world.step(bad)


def test_diffusion_worlds_expose_a_consistent_transition_chain(world_and_device, gen):
    world, device = world_and_device
    if not hasattr(world, "transition_sampler"):
        pytest.skip(f"{type(world).__name__} is not a diffusion world")
    assert isinstance(world, DiffusionWorld)
    x = _states(world, 3, device)
    chain = world.transition_sampler(x)
    assert isinstance(chain, TransitionChain)
    times = chain.times
    assert times.ndim == 1 and times.numel() >= 2 and bool((times[1:] < times[:-1]).all())
    xt = chain.init(gen(4, device))
    assert xt.shape == x.shape
    for j in range(times.numel() - 1):
        k = chain.kernel(xt, j)
        assert k.mean.shape == x.shape and bool((k.var >= 0).all())
        assert chain.denoise(xt, j).shape == x.shape
        v = chain.denoise_var(j)
        assert torch.broadcast_shapes(v.shape, x.shape) == x.shape and bool((v >= 0).all())
        xt = k.sample(gen(5 + j, device))
    last = chain.denoise_var(times.numel() - 1)
    assert bool((chain.denoise_var(0) >= last).all())
    # running the chain with one generator reproduces world.step with the same seed
    g = gen(6, device)
    xt = chain.init(g)
    for j in range(times.numel() - 1):
        xt = chain.kernel(xt, j).sample(g)
    torch.testing.assert_close(xt, world.step(x, gen(6, device)), rtol=0, atol=0)
