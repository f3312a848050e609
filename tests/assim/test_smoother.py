"""Exactness of the space-time Gaussian smoother (Matheron + Woodbury) against the
dense closed-form conditional."""

from __future__ import annotations

import torch

from assim.smoother import GaussianWindowPrior, gaussian_conditional


def _prior(p: int = 10, r: int = 3, seed: int = 0, device="cpu") -> GaussianWindowPrior:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))
    lam = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[:r]
    rho = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)[:r]
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    k = a @ a.T / p + 0.1 * torch.eye(p, dtype=torch.float64)
    return GaussianWindowPrior(u, lam, rho, k).to(device)


def _dense_cov(pr: GaussianWindowPrior, n_steps: int) -> torch.Tensor:
    """Cov[(k,p),(l,q)] = sum_i U_pi U_qi lam_i rho_i^|k-l| + delta_kl K_pq."""
    w = torch.block_diag(*[pr.basis] * n_steps)
    return w @ pr.amp_cov(n_steps) @ w.T + torch.block_diag(*[pr.resid_cov] * n_steps)


def test_amp_cov_is_ar1() -> None:
    pr = _prior()
    c = pr.amp_cov(4).reshape(4, 3, 4, 3)
    assert torch.allclose(c[1, 0, 3, 0], pr.lam[0] * pr.rho[0] ** 2)
    assert float(c[1, 0, 3, 1]) == 0.0


def test_posterior_mean_is_exact(device) -> None:
    pr = _prior(device=device)
    g = torch.Generator(device=device).manual_seed(1)
    x = pr.sample(1, 4, g)[0]
    hid = torch.rand(x.shape, generator=g, device=device) < 0.5
    z = x.masked_fill(hid, float("nan"))
    _, mean = pr.posterior(z, 4, g)
    full = _dense_cov(pr, 4)
    ref, _ = gaussian_conditional(
        torch.zeros(40, dtype=full.dtype, device=device), full, z.flatten()
    )
    # closed form vs Woodbury: agreement to round-off
    assert torch.allclose(mean.flatten(), ref, atol=1e-9, rtol=0)


def test_posterior_samples_match_conditional_covariance(gen) -> None:
    pr = _prior(p=6)
    g = gen(2)
    x = pr.sample(1, 3, g)[0]
    hid = torch.zeros_like(x, dtype=torch.bool)
    hid[0, :3] = hid[1, 2:5] = hid[2, 4:] = True
    z = x.masked_fill(hid, float("nan"))
    n = 20000
    smp, _ = pr.posterior(z, n, g)
    mean, cov = gaussian_conditional(
        torch.zeros(18, dtype=torch.float64), _dense_cov(pr, 3), z.flatten()
    )
    flat = smp.reshape(n, -1)[:, hid.flatten()]
    m, c = mean[hid.flatten()], cov[hid.flatten()][:, hid.flatten()]
    # MC error: sd(mean_hat_i) = sqrt(c_ii / n); sd(cov_hat_ij) = sqrt((c_ii c_jj + c_ij^2) / n).
    # 5 sd over 9 means / 81 covariances: false failure probability < 1e-4.
    sd_m = (torch.diagonal(c) / n).sqrt()
    assert torch.all((flat.mean(0) - m).abs() < 5 * sd_m)
    d = torch.diagonal(c)
    sd_c = ((d[:, None] * d[None, :] + c**2) / n).sqrt()
    assert torch.all((torch.cov(flat.T) - c).abs() < 5 * sd_c)
    # observed entries are reproduced (to round-off; impute_array copies them exactly)
    assert torch.allclose(smp[:, ~hid], z[~hid].expand(n, -1), atol=1e-10)


def test_prior_sample_covariance(gen) -> None:
    pr = _prior(p=4)
    n = 40000
    s = pr.sample(n, 2, gen(3)).reshape(n, -1)
    full = _dense_cov(pr, 2)
    d = torch.diagonal(full)
    sd = ((d[:, None] * d[None, :] + full**2) / n).sqrt()
    assert torch.all((torch.cov(s.T) - full).abs() < 5 * sd)


def test_rank_zero_is_kriging() -> None:
    pr = _prior()
    pr0 = GaussianWindowPrior(pr.basis[:, :0], pr.lam[:0], pr.rho[:0], pr.resid_cov)
    g = torch.Generator().manual_seed(4)
    x = pr0.sample(1, 1, g)[0]
    x[0, :4] = float("nan")
    _, mean = pr0.posterior(x, 2, g)
    ref, _ = gaussian_conditional(torch.zeros(10, dtype=torch.float64), pr.resid_cov, x[0])
    assert torch.allclose(mean[0], ref, atol=1e-10)
