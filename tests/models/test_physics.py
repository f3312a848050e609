"""Simulators: climatology, conservation laws, Lyapunov exponent, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.physics import Kolmogorov, Lorenz63, Lorenz96

# ----------------------------------------------------------------- Lorenz-96


def test_l96_tendency_matches_index_formula(device):
    # An explicit loop over dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F; it catches a
    # wrong roll direction, which the energy identity below would not.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device)
    m = Lorenz96(n=7, F=3.5)
    n = 7
    ref = torch.stack(
        [
            (x[:, (i + 1) % n] - x[:, (i - 2) % n]) * x[:, (i - 1) % n] - x[:, i] + 3.5
            for i in range(n)
        ],
        dim=1,
    )
    torch.testing.assert_close(m.tendency(x), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_l96_advection_conserves_energy(device, dtype, tol):
    # sum_i x_i (x_{i+1} - x_{i-2}) x_{i-1} telescopes to 0; compare with the size of the
    # individual terms so that the bound is relative round-off.
    g = torch.Generator().manual_seed(2)
    x = (5 * torch.randn(16, 40, generator=g, dtype=torch.float64)).to(device, dtype)
    adv = Lorenz96.advection(x)
    assert adv.dtype == dtype and adv.device.type == device.type
    energy_rate = (x * adv).sum(-1)
    scale = (x * adv).abs().sum(-1)
    assert (energy_rate.abs() / scale).max() < tol


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 80), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 100.0))
def test_l96_energy_identity_any_size(n, seed, scale):
    # Lorenz-96 "any size": the identity holds for every ring length n >= 4.
    x = scale * torch.randn(
        3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    adv = Lorenz96.advection(x)
    assert ((x * adv).sum(-1).abs() / (x * adv).abs().sum(-1)).max() < 1e-12


def test_l96_climatology_f8(device):
    # Lorenz-96, n=40, F=8: long-run mean ~2.3 and std ~3.6 per variable (Lorenz 1996;
    # the quoted values are rounded to 0.05). 64 independent members, 10 MTU spin-up,
    # then 100 MTU each. Members are independent, so the Monte-Carlo standard error of
    # the mean (and std) is the spread of per-member statistics / sqrt(64); the
    # tolerance is the rounding of the reference value plus 4 standard errors.
    m = Lorenz96()
    x0 = m.random_state(64, torch.Generator().manual_seed(3), dtype=torch.float64, device=device)
    traj = m.integrate(x0, n_steps=2000, dt=0.05, spinup=200)  # (T, N, 40)
    assert traj.shape == (2000, 64, 40)
    mean_per_member = traj.mean(dim=(0, 2))
    std_per_member = traj.std(dim=(0, 2))
    se_mean = float(mean_per_member.std()) / 8
    se_std = float(std_per_member.std()) / 8
    assert abs(float(traj.mean()) - 2.3) < 0.05 + 4 * se_mean
    assert abs(float(traj.std()) - 3.6) < 0.05 + 4 * se_std


# ----------------------------------------------------------------- Lorenz-63


def test_l63_leading_lyapunov_exponent(device):
    # Two-trajectory method (Benettin et al. 1980): a companion at distance 1e-7 is
    # renormalised each step; the mean log growth rate is the leading exponent, 0.9056
    # (Viswanath 1998). 32 independent members over 40 time units: the per-member
    # finite-time exponents are independent, so the tolerance is 4 standard errors of
    # their mean plus 0.02 for finite-time bias.
    m = Lorenz63()
    g = torch.Generator().manual_seed(4)
    n, eps, dt, burn, k_steps = 32, 1e-7, 0.01, 500, 4000
    x = m.integrate(m.random_state(n, g, torch.float64, device), 1, dt, spinup=1000)[-1]
    d = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    xp = x + eps * d / d.norm(dim=1, keepdim=True)
    log_growth = torch.zeros(n, dtype=torch.float64, device=device)
    for k in range(burn + k_steps):
        x, xp = m.step(x, dt), m.step(xp, dt)
        diff = xp - x
        norm = diff.norm(dim=1)
        if k >= burn:
            log_growth += torch.log(norm / eps)
        xp = x + diff * (eps / norm)[:, None]
    lam = log_growth / (k_steps * dt)
    se = float(lam.std()) / math.sqrt(n)
    assert abs(float(lam.mean()) - 0.9056) < 0.02 + 4 * se


# ---------------------------------------------------------- batch vs single


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sim,steps",
    [(Lorenz63(), 50), (Lorenz96(n=12, F=8.0), 50), (Kolmogorov(n=16, re=100.0), 10)],
    ids=["l63", "l96", "kolmogorov"],
)
def test_batch_equals_single_runs(device, dtype, sim, steps):
    x0 = sim.random_state(4, torch.Generator().manual_seed(5), dtype=dtype, device=device)
    batch = sim.integrate(x0, steps, sim.default_dt)
    assert batch.dtype == dtype and batch.device.type == device.type
    singles = torch.cat([sim.integrate(x0[i : i + 1], steps, sim.default_dt) for i in range(4)], 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(batch, singles, rtol=tol, atol=tol)


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 40\)"):
        Lorenz96().integrate(torch.zeros(40), 3)


# ---------------------------------------------------------------- Kolmogorov


def _taylor_green(k: Kolmogorov, device, dtype=torch.float64):
    y, x = k.grid(dtype, device)
    return x, y, (2 * torch.sin(x) * torch.sin(y))[None]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_taylor_green_exact_viscous_decay(device, dtype, tol):
    # u = (sin x cos y, -cos x sin y), w = 2 sin x sin y: a steady Euler flow, so without
    # forcing w(t) = w(0) exp(-(2 nu + alpha) t) exactly.
    k = Kolmogorov(n=32, re=50.0, drag=0.3, amplitude=0.0)
    _, _, w0 = _taylor_green(k, device, dtype)
    w = w0
    dt, steps = 0.05, 40
    for _ in range(steps):
        w = k.step(w, dt)
    decay = math.exp(-(2 / 50.0 + 0.3) * dt * steps)
    torch.testing.assert_close(w, w0 * decay, rtol=0, atol=tol * 2)


def test_taylor_green_velocity_closed_form(device):
    k = Kolmogorov(n=32)
    x, y, w = _taylor_green(k, device)
    u, v = k.velocity(w)
    torch.testing.assert_close(u[0], torch.sin(x) * torch.cos(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(v[0], -torch.cos(x) * torch.sin(y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_velocity_is_divergence_free_and_inverts_curl(device, dtype, tol):
    k = Kolmogorov(n=32)
    w = k.random_state(3, torch.Generator().manual_seed(6), dtype=dtype, device=device)
    u, v = k.velocity(w)
    assert u.dtype == dtype and u.device.type == device.type
    assert k.divergence(u, v).abs().max() < tol * w.abs().max()
    torch.testing.assert_close(k.curl(u, v), w, rtol=0, atol=tol * float(w.abs().max()))


def test_advection_closed_form(device):
    # w = cos x + cos 2y  =>  psi = cos x + cos(2y)/4, u = -sin(2y)/2, v = sin x and
    # u.grad(w) = -1.5 sin x sin 2y.
    k = Kolmogorov(n=32)
    y, x = k.grid(torch.float64, device)
    w = (torch.cos(x) + torch.cos(2 * y))[None]
    torch.testing.assert_close(
        k.advection(w)[0], -1.5 * torch.sin(x) * torch.sin(2 * y), rtol=0, atol=1e-12
    )


def test_dealiased_advection_conserves_energy_and_enstrophy(device):
    # The 2/3-truncated Galerkin advection conserves energy (sum psi*adv = 0) and
    # enstrophy (sum w*adv = 0) exactly; compare with the size of the terms.
    k = Kolmogorov(n=32)
    w = k.random_state(2, torch.Generator().manual_seed(7), torch.float64, device, k_peak=6)
    adv = k.advection(w)
    psi = torch.fft.irfft2(torch.fft.rfft2(w) * k._ops(w)["inv_k2"], s=w.shape[-2:])
    for f in (w, psi):
        rate = (f * adv).sum((-2, -1))
        scale = (f * adv).abs().sum((-2, -1))
        assert (rate.abs() / scale).max() < 1e-12


def test_laminar_kolmogorov_flow_from_rest(device):
    # From rest the flow stays a shear flow u = U(t) sin(k_f y) (advection vanishes) with
    # dU/dt = A - lam U, lam = nu k_f^2 + alpha: U(t) = A/lam (1 - exp(-lam t)) and
    # w = -dU/dy = -k_f U(t) cos(k_f y). Checks the sign and size of the forcing.
    k = Kolmogorov(n=32, re=40.0, k_f=4, drag=0.1, amplitude=1.5)
    y, _ = k.grid(torch.float64, device)
    w = torch.zeros(1, 32, 32, dtype=torch.float64, device=device)
    dt, steps = 0.02, 100
    for _ in range(steps):
        w = k.step(w, dt)
    lam = 16 / 40.0 + 0.1
    u_amp = 1.5 / lam * (1 - math.exp(-lam * dt * steps))
    torch.testing.assert_close(w[0], -4 * u_amp * torch.cos(4 * y), rtol=0, atol=1e-9)


def test_kolmogorov_time_step_is_fourth_order(device):
    # Nonlinear flow over t = 0.4: errors against a dt/16 reference shrink ~16x per halving.
    k = Kolmogorov(n=32, re=200.0)
    w0 = k.random_state(1, torch.Generator().manual_seed(8), torch.float64, device, rms=4.0)

    def run(dt: float) -> torch.Tensor:
        return k.integrate(w0, round(0.4 / dt), dt)[-1]

    ref = run(0.05 / 16)
    e1 = float((run(0.05) - ref).abs().max())
    e2 = float((run(0.025) - ref).abs().max())
    assert e1 > 0 and math.log2(e1 / e2) > 3.5


def test_kolmogorov_default_run_stays_bounded_and_cfl_ok(device):
    k = Kolmogorov()
    w = k.random_state(2, torch.Generator().manual_seed(9), torch.float32, device)
    w = k.integrate(w, 1, spinup=299)[-1]
    assert torch.isfinite(w).all()
    assert k.default_dt <= k.cfl_dt(w, cfl=1.0)
