"""The conditional diffusion world: chain in state space, model error q, shapes, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.worlds.conditional import Conditional, ConditionalSpec

N_GRID = 8


def small_world(device, history: int = 1, target: str = "increment", **kw) -> Conditional:
    torch.manual_seed(0)  # weight init only; sampling uses explicit generators
    spec = ConditionalSpec(
        state_shape=(N_GRID,),
        dt=0.05,
        history=history,
        target=target,
        backbone="resnet1d",
        backbone_kwargs=dict(width=8, depth=1),
        dims=("x",),
        **kw,
    )
    world = Conditional(spec)
    world.set_normalisation(
        dict(
            state_mean=torch.full((N_GRID,), 2.0),
            state_std=torch.full((N_GRID,), 3.0),
            target_mean=torch.linspace(-0.1, 0.1, N_GRID),
            target_std=torch.linspace(0.2, 0.4, N_GRID),
        )
    )
    return world.to(device).eval()


class DeltaOracle(nn.Module):
    """Exact denoiser of the delta target ``z0 = 0.5 * cond[:, -1]``: ``D = z0`` for all t."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.sigma_data = 1.0

    def forward(self, x_t, t, cond=None):
        return 0.5 * cond[:, -1]


def test_chain_run_by_hand_equals_step(device, gen):
    world = small_world(device)
    x = torch.randn(5, N_GRID, generator=gen(1)).to(device)
    g1, g2 = gen(7, device), gen(7, device)
    stepped = world.step(x, g1)
    chain = world.transition_sampler(x)
    xt = chain.init(g2)
    for j in range(len(chain.times) - 1):
        xt = chain.kernel(xt, j).sample(g2)
    assert torch.equal(stepped, xt)
    # the forecast uses the same chain: two steps of forecast == two world steps
    g1, g2 = gen(3, device), gen(3, device)
    fc = world.forecast(x, 2, members=5, generator=g1)
    assert torch.equal(fc[:, 0], world.step(x, g2))
    assert torch.equal(fc[:, 1], world.step(fc[:, 0], g2))


def test_same_seed_same_forecast_other_seed_differs(device, gen):
    world = small_world(device)
    x0 = torch.randn(N_GRID, generator=gen(0)).to(device)
    a = world.forecast(x0, 3, members=4, generator=gen(11, device))
    b = world.forecast(x0, 3, members=4, generator=gen(11, device))
    c = world.forecast(x0, 3, members=4, generator=gen(12, device))
    assert a.shape == (4, 3, N_GRID)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "em"])
def test_kernel_is_exact_affine_image_of_the_diffusion_kernel(device, gen, sampler):
    """State-space kernel = z-space kernel mapped by x = o + s z / alpha: means, variances
    and log-densities (change of variables: log p_x = log p_z - sum log(s / alpha))."""
    world = small_world(device, sampler=sampler, eta=0.5).double()
    x = torch.randn(3, N_GRID, generator=gen(2), dtype=torch.float64).to(device)
    chain = world.transition_sampler(x)
    xt = chain.init(gen(4, device))
    j = 1
    kx = chain.kernel(xt, j)
    a_t, a_s = chain.alpha[j], chain.alpha[j + 1]
    o, s = x + world.target_mean, world.target_std
    z_t = a_t * (xt - o) / s
    kz = world.sampler.transition(
        z_t, chain.times[j], chain.times[j + 1], world.encode_cond(x[:, None])
    )
    torch.testing.assert_close(kx.mean, o + s * kz.mean / a_s)
    x_s = kx.sample(gen(5, device))
    z_s = a_s * (x_s - o) / s
    jac = torch.log(s / a_s).sum()
    torch.testing.assert_close(kx.log_prob(x_s), kz.log_prob(z_s) - jac)


def test_model_error_q_gives_learned_step_plus_gaussian_noise(device, gen):
    """With an exact delta denoiser the chain stopped at q samples o + s z0 + N(0, q^2).

    Uniform scale s so q is isotropic. n = 4000 particles x 8 points: the sample mean of
    (x - target) has s.e. q / sqrt(32000) ~ 5.6e-4 (tolerance 5 s.e.), the sample variance
    has relative s.e. sqrt(2 / 32000) ~ 0.8 % (tolerance 5 s.e. = 4 %). The init mismatch
    (prior N(0, 1 + 80^2) vs N(z0, 80^2)) is damped by (r_{t_0} / 80)^2 ~ 1e-5.
    """
    q = 0.1
    world = small_world(device, q=q, steps=4).double()
    world.target_std.fill_(0.3)
    world.denoiser = DeltaOracle(world.denoiser.schedule)
    world.configure()
    x = torch.randn(4000, N_GRID, generator=gen(0), dtype=torch.float64).to(device)
    target = x + world.target_mean + 0.3 * 0.5 * world.encode_cond(x[:, None])[:, -1]
    err = world.step(x, gen(1, device)) - target
    n = err.numel()
    assert abs(float(err.mean())) < 5 * q / math.sqrt(n)
    assert abs(float(err.var()) / q**2 - 1) < 5 * math.sqrt(2 / n)
    chain = world.transition_sampler(x[:2])
    torch.testing.assert_close(chain.denoise_var(len(chain.times) - 1), torch.full_like(x[0], q**2))
    torch.testing.assert_close(chain.denoise(chain.init(gen(3, device)), 0), target[:2])


def test_denoise_var_tweedie_before_last_and_q2_at_last(device):
    q = 0.05
    world = small_world(device, q=q)
    chain = world.transition_sampler(torch.zeros(2, N_GRID, device=device))
    last = len(chain.times) - 1
    s2 = world.target_std**2
    q2 = s2 * float(chain.ratio[-1]) ** 2
    torch.testing.assert_close(q2.mean(), torch.tensor(q**2, device=device))  # rms(s) r_0 = q
    torch.testing.assert_close(chain.denoise_var(last), q2)
    for j in range(last):
        r2 = float(chain.ratio[j]) ** 2
        torch.testing.assert_close(chain.denoise_var(j), s2 * r2 / (1 + r2) + q2)
    # a calibration table replaces the Gaussian value: mse(r) = 0.01 r^2 interpolates exactly
    world.cal_log_ratio.copy_(torch.linspace(-6, 4.5, world.cal_mse.numel()))
    world.cal_mse.copy_(0.01 * torch.exp(2 * world.cal_log_ratio))
    r = chain.ratio[2]
    torch.testing.assert_close(chain.denoise_var(2), s2 * 0.01 * r**2 + q2)


def test_state_target_offset_is_the_mean(device, gen):
    world = small_world(device, target="state")
    x = torch.randn(3, N_GRID, generator=gen(0)).to(device)
    z0, _ = world.encode_pair(x[:, None], x)
    torch.testing.assert_close(z0, (x - world.target_mean) / world.target_std)


def test_wrong_grid_shape_and_variable_raise_naming_both(device):
    world = small_world(device)
    with pytest.raises(ValueError, match=r"\(3, 9\).*\(8,\)"):
        world.step(torch.zeros(3, 9, device=device))
    with pytest.raises(ValueError, match=r"\(9,\).*\(8,\)"):
        world.check_data(shape=(9,))
    with pytest.raises(ValueError, match="'temp'.*'x'"):
        world.check_data(variable="temp")
    world.check_data(variable="x", shape=(N_GRID,))  # matching: no error


def test_history_two_rolls_a_window(device, gen):
    world = small_world(device, history=2)
    window = torch.randn(3, 2, N_GRID, generator=gen(0)).to(device)
    fc = world.forecast(window, 3, members=3, generator=gen(1, device))
    assert fc.shape == (3, 3, N_GRID)
    g = gen(1, device)
    first = world.step(window, g)
    second = world.step(torch.stack([window[:, 1], first], 1), g)
    assert torch.equal(fc[:, 0], first) and torch.equal(fc[:, 1], second)
    with pytest.raises(ValueError, match="expected"):
        world.step(window[:, 0])  # a single state is not a window when h = 2


@pytest.mark.parametrize("name", ["l96", "l63"])
def test_shipped_checkpoints_learned_the_step_and_q_adds_in_quadrature(name, gen):
    """The shipped worlds (models/checkpoints) on held-out attractor states (seed 5, not the
    training seed): one-step RMSE far below the increment's std (0.92 / 0.67), and with q
    the RMSE is sqrt(e0^2 + q^2). 64 x S errors: the RMSE's relative s.e. is
    sqrt(1 / (2 n)) (<= 6.3 % for L63's n = 192); tolerance 4 s.e."""
    import models
    from models.physics import Lorenz63, Lorenz96

    world = models.load(name)
    sim, dims = (Lorenz96(40), ("x",)) if name == "l96" else (Lorenz63(), ("component",))
    assert world.state_shape == sim.state_shape and world.dims == dims
    assert world.variable == "state" and world.dt == pytest.approx(sim.default_dt)
    x = sim.integrate(sim.random_state(64, gen(5), dtype=torch.float64), 1, spinup=1500)[0]
    y = sim.step(x).float()
    x = x.float()
    e0 = float(((world.step(x, gen(0)) - y) ** 2).mean().sqrt())
    assert e0 < 0.02
    q = 0.1
    eq = float(((world.configure(q=q).step(x, gen(1)) - y) ** 2).mean().sqrt())
    expected = math.sqrt(e0**2 + q**2)
    assert abs(eq / expected - 1) < 4 * math.sqrt(1 / (2 * y.numel()))


def test_q_outside_the_schedule_range_is_refused(device):
    world = small_world(device, q=1e5)
    with pytest.raises(ValueError, match="q=100000.0.*noise range"):
        world.transition_sampler(torch.zeros(2, N_GRID, device=device))
