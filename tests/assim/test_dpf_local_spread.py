"""The analysis spread factor of the localised diffusion particle filter.

``spread_factor = beta`` multiplies the analysis anomalies by ``beta`` after the rest of
the cycle (local resampling, hybrid LETKF step). Checks: ``beta = 1`` is bit for bit the
old path; with ``beta < 1`` the output equals the closed form ``xbar + beta (x - xbar)`` of
the ``beta = 1`` output drawn with the same random numbers (mean unchanged, variances
times ``beta^2``: exact identities, checked to rounding error); forecast-only cycles are
untouched; bad values raise.
"""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf import make_dpf
from assim.filters.dpf_local import LocalDiffusionParticleFilter, scale_anomalies
from assim.obs import Arctan, GaussianNoise, Observation, Subset
from models.worlds.diffusion_lg import DiffusionLinearGaussian

F64 = torch.float64


def _setup(device):
    d = 12
    eye = torch.eye(d, dtype=F64)
    world = DiffusionLinearGaussian(0.9 * eye, None, 0.3 * eye, steps=2, q=0.1).to(device)
    obs = Observation(Arctan(Subset(every=3)), GaussianNoise(std=0.1))
    y = torch.tensor([0.5, -0.2, 0.1, 1.0], dtype=F64, device=device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, d, generator=g, dtype=F64).to(device)
    return world, obs, y, x0


def _cycle(filt, world, x0, y, obs, device):
    g = torch.Generator(device=device).manual_seed(3)
    return filt.cycle(world, Ensemble(x0), y, obs, g)


@pytest.mark.parametrize("hybrid", [0.0, 0.5])
def test_spread_factor_one_is_the_old_path(hybrid, device):
    world, obs, y, x0 = _setup(device)
    old = _cycle(make_dpf(world, radius=2.0, hybrid=hybrid), world, x0, y, obs, device)[0]
    filt = make_dpf(world, radius=2.0, hybrid=hybrid)
    filt.spread_factor = 1.0
    new, info = _cycle(filt, world, x0, y, obs, device)
    assert torch.equal(old.x, new.x) and torch.equal(old.log_w, new.log_w)
    assert "spread_factor" not in info


@pytest.mark.parametrize("hybrid", [0.0, 0.5])
def test_spread_factor_scales_the_analysis_anomalies(hybrid, device):
    """Same random numbers, ``beta = 0.8``: the output is the closed form of the ``beta = 1``
    output (to float64 rounding, 1e-12); its mean is unchanged and its variance is
    ``beta^2`` times the old one; a factor applied twice or to the forecast would fail."""
    world, obs, y, x0 = _setup(device)
    beta = 0.8
    ref, _ = _cycle(LocalDiffusionParticleFilter(radius=2.0, hybrid=hybrid), world, x0, y, obs,
                    device)  # fmt: skip
    filt = LocalDiffusionParticleFilter(radius=2.0, hybrid=hybrid, spread_factor=beta)
    out, info = _cycle(filt, world, x0, y, obs, device)
    assert info["spread_factor"] == beta
    m = ref.x.mean(0)
    torch.testing.assert_close(out.x, m + beta * (ref.x - m), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.mean(), ref.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.var(), beta**2 * ref.var(), rtol=1e-10, atol=0)
    assert float(ref.var().min()) > 1e-3  # the check above is not vacuous


def test_scale_anomalies_uses_the_weights(device):
    """Weighted ensemble: the weighted mean is kept and the weighted variance is scaled."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, generator=g, dtype=F64).to(device)
    log_w = torch.log_softmax(torch.randn(50, generator=g, dtype=F64), 0).to(device)
    ens = Ensemble(x, log_w)
    out = scale_anomalies(ens, 0.5)
    assert torch.equal(out.log_w, ens.log_w)
    torch.testing.assert_close(out.mean(), ens.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.var(), 0.25 * ens.var(), rtol=1e-10, atol=0)


def test_forecast_only_cycles_are_untouched(device):
    world, _, _, x0 = _setup(device)
    obs = Observation(Arctan(Subset(every=3)), GaussianNoise(std=0.1))
    ref, _ = _cycle(LocalDiffusionParticleFilter(radius=2.0), world, x0, None, obs, device)
    filt = LocalDiffusionParticleFilter(radius=2.0, spread_factor=0.5)
    out, info = _cycle(filt, world, x0, None, obs, device)
    assert info["skipped"] and torch.equal(out.x, ref.x)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, math.nan])
def test_bad_spread_factor_raises(beta):
    with pytest.raises(InputError, match="spread_factor"):
        LocalDiffusionParticleFilter(radius=2.0, spread_factor=beta)
    filt = LocalDiffusionParticleFilter(radius=2.0)
    with pytest.raises(InputError, match="spread_factor"):
        filt.spread_factor = beta


def test_make_dpf_routes_spread_factor():
    filt = make_dpf(None, radius=2.0, spread_factor=0.9)
    assert filt.spread_factor == 0.9
    assert make_dpf(None, radius=2.0).spread_factor == 1.0
    with pytest.raises(InputError, match="localised"):
        make_dpf(None, spread_factor=0.9)  # the global dpf stays exact
    assert make_dpf(None, spread_factor=1.0).__class__.__name__ == "DiffusionParticleFilter"
