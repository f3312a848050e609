"""Baselines: kriging equals the Gaussian conditional, LOO shortcut equals brute force,
linear interpolation is exact on planes, climatology matches numpy, CV finds the length."""

from __future__ import annotations

import numpy as np
import torch

from assim.baselines import (
    MaternOI,
    chordal_distance,
    fit_matern_oi,
    grouped_climatology,
    linear_interp,
    matern,
    oi_loo_residual,
    zscore,
)
from assim.smoother import gaussian_conditional


def _points(n: int = 6, seed: int = 0):
    lat = torch.linspace(-20, 20, n, dtype=torch.float64)
    lon = torch.linspace(150, 200, n, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return la.flatten(), lo.flatten()


def test_matern_and_distance_closed_forms() -> None:
    d = chordal_distance(
        torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([90.0])
    )
    assert torch.allclose(d, torch.tensor([[6371.0 * 2**0.5]], dtype=torch.float64))
    r = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(matern(r, 1.0, 0.5), torch.exp(-r))
    s = 3**0.5 * r
    assert torch.allclose(matern(r, 1.0, 1.5), (1 + s) * torch.exp(-s))


def test_kriging_is_the_gaussian_conditional() -> None:
    la, lo = _points()
    oi = MaternOI(la, lo, 1500.0, 0.05, 0.8, 1.5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(la.numel(), generator=g, dtype=torch.float64)
    z[torch.randperm(la.numel(), generator=g)[:12]] = float("nan")
    mean, var = oi.predict(z)
    ref_m, ref_c = gaussian_conditional(torch.zeros_like(z), oi.cov(), z)
    assert torch.allclose(mean, ref_m, atol=1e-10)
    assert torch.allclose(var, torch.diagonal(ref_c), atol=1e-10)


def test_loo_shortcut_equals_brute_force() -> None:
    la, lo = _points(4)
    oi = MaternOI(la, lo, 1000.0, 0.1, 1.3, 2.5)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, la.numel(), generator=g, dtype=torch.float64)
    r, v = oi.loo(z)
    for i in (0, 5, 15):
        zi = z[1].clone()
        zi[i] = float("nan")
        m, var = oi.predict(zi)
        assert torch.allclose(r[1, i], z[1, i] - m[i], atol=1e-10)
        assert torch.allclose(v[1, i], var[i], atol=1e-10)
    s = oi_loo_residual(z, oi)
    assert torch.allclose(s, (r / v.sqrt()).abs())


def test_linear_interp_is_exact_on_a_plane() -> None:
    rng = np.random.default_rng(0)
    lat, lon = np.meshgrid(np.linspace(0, 10, 8), np.linspace(20, 40, 9), indexing="ij")
    lat, lon = lat.ravel(), lon.ravel()
    f = 2.0 + 0.3 * lat - 0.1 * lon
    x = f.copy()
    inner = (lat > 0) & (lat < 10) & (lon > 20) & (lon < 40)
    hide = inner & (rng.random(f.size) < 0.4)
    x[hide] = np.nan
    out = linear_interp(x, lat, lon)
    assert np.allclose(out[hide], f[hide], atol=1e-9)
    assert np.array_equal(out[~hide], f[~hide])


def test_grouped_climatology_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(24, 5))
    v[3, 2] = np.nan
    g = np.arange(24) % 12
    mean, std = grouped_climatology(torch.from_numpy(v), torch.from_numpy(g), 12)
    ref = np.stack([np.nanmean(v[g == k], 0) for k in range(12)])
    assert np.allclose(mean.numpy(), ref)
    anom = v - ref[g]
    assert np.allclose(std.numpy(), np.sqrt(np.nanmean(anom**2, 0)))
    zs = zscore(torch.from_numpy(v), mean, std, torch.from_numpy(g))
    assert np.allclose(zs.numpy()[0], np.abs(anom[0]) / std.numpy())


def test_cross_validation_recovers_the_length_scale() -> None:
    """Fields drawn from a Matérn GP with length 1000 km: LOO-CV picks 1000 among
    candidates spaced by a factor 4 (with 60 fields the LOO log score separates them by
    many standard errors; seeded)."""
    la, lo = _points(8)
    truth = MaternOI(la, lo, 1000.0, 0.05, 1.0, 1.5)
    g = torch.Generator().manual_seed(2)
    chol = torch.linalg.cholesky(truth.cov())
    z = torch.randn(60, la.numel(), generator=g, dtype=torch.float64) @ chol.T
    fit = fit_matern_oi(z, la, lo, lengths=(250.0, 1000.0, 4000.0), nuggets=(0.05,))
    assert fit.length == 1000.0
    assert 0.7 < fit.scale < 1.4
