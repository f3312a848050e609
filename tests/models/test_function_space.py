"""Function-space world: GP noise covariance, exact GP kernel densities, and sampling at
other resolutions with the right spectrum."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.checkpoint import load, save
from models.diffusion.gp_noise import GPKernel, MaternGP
from models.worlds.function_space import FunctionSpace, FunctionSpaceSpec


def _direct_covariance(gp: MaternGP, shape: tuple[int, ...]) -> torch.Tensor:
    """``C_ij = sum_k S(k) cos(2 pi k.(x_i - x_j))`` by an explicit sum over the grid's
    wave vectors (an independent path to the FFT implementation)."""
    spec = gp.spectrum(shape).flatten()
    freqs = [
        torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64) / L
        for n, L in zip(shape, gp.lengths, strict=True)
    ]
    k = torch.stack([g.flatten() for g in torch.meshgrid(*freqs, indexing="ij")], 1)  # (K, d)
    pos = [
        torch.arange(n, dtype=torch.float64) * L / n for n, L in zip(shape, gp.lengths, strict=True)
    ]
    x = torch.stack([g.flatten() for g in torch.meshgrid(*pos, indexing="ij")], 1)  # (D, d)
    phase = 2 * math.pi * (x @ k.T)  # (D, K)
    return (phase.cos() * spec) @ phase.cos().T + (phase.sin() * spec) @ phase.sin().T


@pytest.mark.parametrize("lengths,shape", [((3.0,), (12,)), ((2.0, 1.0), (6, 4))])
def test_gp_covariance_matches_analytic(lengths, shape, gen):
    gp = MaternGP(lengths, lengthscale=0.4, nu=1.5, variance=2.0)
    c = gp.covariance(shape)
    torch.testing.assert_close(c, _direct_covariance(gp, shape))
    # Monte-Carlo: the empirical second moment of M draws has per-entry sd
    # sqrt((C_ii C_jj + C_ij^2) / M) (Isserlis); allow 5 sd on every entry.
    m = 20000
    x = gp.sample((m, *shape), gen(0), dtype=torch.float64).reshape(m, -1)
    emp = x.T @ x / m
    sd = ((c.diag()[:, None] * c.diag()[None, :] + c**2) / m).sqrt()
    assert float(((emp - c).abs() / sd).max()) < 5.0
    # continuum normalisation: the grid keeps modes up to Nyquist, variance <= 2
    assert 0.5 * 2.0 < gp.marginal_variance(shape) <= 2.0


def test_gp_is_defined_in_physical_units():
    gp = MaternGP((4.0,), lengthscale=0.5, nu=2.5)
    coarse, fine = gp.spectrum((16,)), gp.spectrum((64,))
    # the same physical wave numbers get the same variance on both grids
    torch.testing.assert_close(coarse[:8], fine[:8])
    assert gp.marginal_variance((64,)) > gp.marginal_variance((16,))


def test_gp_kernel_log_prob_is_exact(device, gen):
    gp = MaternGP((5.0,), lengthscale=1.0, nu=1.5)
    c = gp.covariance((10,)).to(device)
    mean = torch.randn(4, 10, generator=gen(1), dtype=torch.float64).to(device)
    x = torch.randn(4, 10, generator=gen(2), dtype=torch.float64).to(device)
    k = GPKernel(mean, torch.tensor(0.3, dtype=torch.float64, device=device), gp)
    want = torch.distributions.MultivariateNormal(mean, 0.3 * c).log_prob(x)
    torch.testing.assert_close(k.log_prob(x), want)
    assert k.sample(gen(3, device)).shape == mean.shape


class FourierOracle(nn.Module):
    """Exact ``E[z_0 | z_t]`` for data ``z_0 ~ GP_data`` and noise ``GP_noise``: per Fourier
    mode ``alpha S_d / (alpha^2 S_d + sigma^2 S_n) z_t`` (both priors diagonal in Fourier
    space, defined in physical units, so the oracle works on any grid)."""

    def __init__(self, data: MaternGP, noise: MaternGP, schedule) -> None:
        super().__init__()
        self.data, self.noise, self.schedule, self.sigma_data = data, noise, schedule, 1.0

    def forward(self, z_t, t, cond=None):
        shape = tuple(z_t.shape[1:])
        alpha, sigma = (float(v) for v in self.schedule(torch.as_tensor(t, dtype=torch.float64)))
        sd, sn = self.data.spectrum(shape), self.noise.spectrum(shape)
        gain = alpha * sd / (alpha**2 * sd + sigma**2 * sn)
        dims = tuple(range(1, z_t.dim()))
        zf = torch.fft.fftn(z_t.double(), dim=dims, norm="ortho")
        return torch.fft.ifftn(zf * gain, dim=dims, norm="ortho").real.to(z_t.dtype)


def _fit(k: torch.Tensor, power: torch.Tensor, band: tuple[float, float]) -> float:
    """Least-squares slope of log power vs log wave number over ``band`` (cycles/unit)."""
    sel = (k >= band[0]) & (k <= band[1])
    lk, lp = k[sel].log(), power[sel].log()
    return float(((lk - lk.mean()) * (lp - lp.mean())).sum() / ((lk - lk.mean()) ** 2).sum())


def _slope(x: torch.Tensor, length: float, band: tuple[float, float]) -> float:
    """Spectral slope of samples ``x`` ``(M, n)`` on a periodic domain of ``length``."""
    n = x.shape[-1]
    power = torch.fft.rfft(x.double(), norm="ortho").abs().pow(2).mean(0)
    return _fit(torch.fft.rfftfreq(n, d=length / n, dtype=torch.float64), power, band)


def _oracle_world(n: int, data: MaternGP) -> FunctionSpace:
    spec = FunctionSpaceSpec(
        state_shape=(n,),
        dt=1.0,
        target="state",
        lengths=(32.0,),
        lengthscale=2.0,
        steps=24,
        backbone_kwargs=dict(width=4, depth=1),
    )
    world = FunctionSpace(spec).eval()
    world.denoiser = FourierOracle(data, world.gp, world.denoiser.schedule)
    return world.configure()


@pytest.mark.parametrize("n", [32, 128])
def test_samples_at_other_resolutions_have_the_data_spectrum(n, gen):
    # Toy problem: the next state is a Matérn field (nu = 1, ell = 4 on L = 32); sampling
    # on 32 and 128 points must reproduce its spectrum slope. Tolerance 0.25: MC sd of the
    # fitted slope from M = 256 draws is ~0.05 (log-power sd 1/sqrt(M) per mode); the
    # rest is the 24-step DDPM discretisation.
    data = MaternGP((32.0,), lengthscale=4.0, nu=1.0)
    world = _oracle_world(n, data)
    x = world.step(torch.zeros(256, n), gen(0))
    band = (0.15, 0.45) if n == 32 else (0.15, 1.8)
    k = torch.fft.rfftfreq(n, d=32.0 / n, dtype=torch.float64)
    want = _fit(k, data.spectrum((n,))[: n // 2 + 1], band)  # analytic local slope
    assert want < -1.5  # steep enough that a white or wrong spectrum would fail
    assert abs(_slope(x, 32.0, band) - want) < 0.25


def test_regrid_shares_weights_and_round_trips(tmp_path, gen):
    spec = FunctionSpaceSpec(
        state_shape=(8, 8),
        dims=("y", "x"),
        dt=0.1,
        lengths=(6.28, 6.28),
        steps=2,
        backbone_kwargs=dict(width=4, depth=1),
    )
    world = FunctionSpace(spec).eval()
    world.set_normalisation(dict(state_mean=1.0, state_std=2.0, target_mean=0.0, target_std=0.5))
    fine = world.regrid((16, 16))
    assert fine.state_shape == (16, 16) and fine.gp.lengths == world.gp.lengths
    for (name, p), q in zip(
        world.denoiser.named_parameters(), fine.denoiser.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=name)
    assert float(fine.target_std.flatten()[0]) == 0.5
    assert fine.forecast(torch.zeros(16, 16), 2, members=3, generator=gen(0)).shape == (
        3,
        2,
        16,
        16,
    )
    save(fine, tmp_path / "fs.pt")
    again = load(tmp_path / "fs.pt")
    assert isinstance(again, FunctionSpace) and again.state_shape == (16, 16)
    x = torch.randn(2, 16, 16, generator=gen(1))
    torch.testing.assert_close(again.step(x, gen(2)), fine.step(x, gen(2)))


def test_pointwise_normalisation_is_refused():
    spec = FunctionSpaceSpec(state_shape=(8,), dt=0.1, backbone_kwargs=dict(width=4, depth=1))
    with pytest.raises(ValueError, match="global normalisation"):
        FunctionSpace(spec).set_normalisation(
            dict(state_mean=torch.arange(8.0), state_std=1.0, target_mean=0.0, target_std=1.0)
        )
