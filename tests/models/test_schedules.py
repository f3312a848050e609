"""Schedules: identities that define them, inverses, and SDE coefficients (vs autograd)."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.schedules import EDM, CosineVP, LinearVP

SCHEDULES = [CosineVP(), LinearVP(), EDM(), CosineVP(-6.0, 8.0), EDM(0.01, 20.0, 3.0)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_alpha_sigma_and_log_snr_agree(schedule, device):
    t = torch.linspace(0, 1, 101, dtype=torch.float64, device=device)
    alpha, sigma = schedule(t)
    assert alpha.shape == t.shape and alpha.device == t.device
    torch.testing.assert_close(schedule.log_snr(t), torch.log(alpha**2 / sigma**2))
    if schedule.variance_preserving:
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    else:
        torch.testing.assert_close(alpha, torch.ones_like(t))
    lam = schedule.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease with t"
    assert torch.isfinite(lam).all() and sigma[0] < 0.02 and (sigma / alpha)[-1] > 15


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_inverses_round_trip(schedule, device):
    t = torch.linspace(0, 1, 57, dtype=torch.float64, device=device)
    torch.testing.assert_close(schedule.t_of_log_snr(schedule.log_snr(t)), t)
    torch.testing.assert_close(schedule.t_of_sigma_ratio(schedule.sigma_ratio(t)), t)
    # levels outside the schedule's range clamp to its ends
    assert schedule.t_of_sigma_ratio(1e-9).item() == 0.0
    assert schedule.t_of_sigma_ratio(1e9).item() == 1.0
    with pytest.raises(ValueError, match="ratio"):
        schedule.t_of_sigma_ratio(-1.0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_derivatives_match_autograd(schedule):
    """``dlog_snr`` and ``(f, g^2)`` against autograd of ``log alpha`` and ``sigma^2``:
    ``f = d log alpha / dt``, ``g^2 = d sigma^2 / dt - 2 f sigma^2``."""
    t = torch.linspace(0.01, 0.99, 31, dtype=torch.float64).requires_grad_()
    (dlam,) = torch.autograd.grad(schedule.log_snr(t).sum(), t)
    torch.testing.assert_close(schedule.dlog_snr(t.detach()), dlam)
    alpha, sigma = schedule(t)
    f, g2 = schedule.drift_diffusion(t.detach())
    if schedule.variance_preserving:
        (dlog_alpha,) = torch.autograd.grad(alpha.log().sum(), t, retain_graph=True)
    else:
        dlog_alpha = torch.zeros_like(t)
    (dsigma2,) = torch.autograd.grad((sigma**2).sum(), t)
    torch.testing.assert_close(f, dlog_alpha)
    torch.testing.assert_close(g2, dsigma2 - 2 * dlog_alpha * sigma.detach() ** 2)
    assert torch.all(g2 > 0)


def test_edm_uniform_t_is_rho_spacing():
    """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) -
    smax^(1/rho)))^rho; with our t = 1 - i/(N-1)."""
    s = EDM(0.002, 80.0, 7.0)
    n = 18
    i = torch.arange(n, dtype=torch.float64)
    expect = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s.sigma(1 - i / (n - 1)), expect)


def test_float_input_and_bad_arguments():
    alpha, sigma = CosineVP()(0.5)
    assert alpha.ndim == 0 and 0 < alpha.item() < 1
    with pytest.raises(ValueError, match="log_snr_min"):
        CosineVP(5.0, 1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        LinearVP(beta_min=5.0, beta_max=1.0)
