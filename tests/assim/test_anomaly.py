"""Anomaly scores: exact predictive statistics, false-alarm rate on prior draws at the
chosen level, DTE recovers the noise level, detection of spikes and frozen fields, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

from assim.anomaly import (
    _two_sided_log10p,
    clean_threshold,
    dte_scores,
    evidence_scores,
    flags,
    imputation_scores,
    predictive,
    threshold_for_far,
)
from assim.cli import main
from assim.errors import InputError
from assim.impute import FieldPrior


def _prior(nlat: int = 4, nlon: int = 5, seed: int = 0) -> tuple[FieldPrior, np.ndarray]:
    lat = torch.linspace(-10.0, 10.0, nlat, dtype=torch.float64)
    lon = torch.linspace(100.0, 130.0, nlon, dtype=torch.float64)
    la, lo = (a.flatten() for a in torch.meshgrid(lat, lon, indexing="ij"))
    p = la.numel()
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, 2, generator=g, dtype=torch.float64))
    prior = FieldPrior(
        la,
        lo,
        10 + torch.randn(1, p, generator=g, dtype=torch.float64),
        0.5 + torch.rand(p, generator=g, dtype=torch.float64),
        u,
        torch.tensor([3.0, 1.0], dtype=torch.float64),
        torch.tensor([0.9, 0.5], dtype=torch.float64),
        800.0,
        0.1,
        0.5,
    )
    return prior, np.ones((nlat, nlon), bool)


def _pairs(prior: FieldPrior, n: int, seed: int) -> torch.Tensor:
    """``n`` independent prior windows of 2 steps, concatenated ``(2n, P)``."""
    z = prior.window.sample(n, 2, torch.Generator().manual_seed(seed)).reshape(2 * n, -1)
    return prior.destandardize(z, torch.zeros(2 * n, dtype=torch.long))


def test_log10p_matches_closed_form() -> None:
    z = torch.tensor([0.0, 1.0, 3.0, 10.0, 40.0], dtype=torch.float64)
    ref = torch.log10(torch.special.erfc(z / math.sqrt(2)))
    assert torch.allclose(_two_sided_log10p(z)[:4], ref[:4], atol=1e-9)
    assert torch.isfinite(_two_sided_log10p(z)[4]) and _two_sided_log10p(z)[4] < -300


def test_predictive_statistics_are_standard_normal() -> None:
    """Innovation r = z_k - G z_{k-1} ~ N(0, S) exactly: the standardised innovation and
    the LOO statistic (Q r)_i / sqrt(Q_ii) are N(0, 1) at every point. With n = 4000
    independent windows, the exceedance fraction of 1.96 at a point is Binomial(n,
    0.05)/n (sd 0.0034): tolerance 4.5 sd; mean square within 5 sqrt(2/n)."""
    prior, _ = _prior()
    n = 4000
    x = _pairs(prior, n, 1)
    z = prior.standardize(x, torch.zeros(2 * n, dtype=torch.long))
    gain, s = predictive(prior)
    r = z[1::2] - z[0::2] @ gain.T
    q = torch.linalg.inv(s)
    for stat in (r / torch.diagonal(s).sqrt(), (r @ q) / torch.diagonal(q).sqrt()):
        frac = (stat.abs() > 1.959964).double().mean(0)  # per point, (P,)
        assert torch.all((frac - 0.05).abs() < 4.5 * math.sqrt(0.05 * 0.95 / n))
        assert torch.all(((stat**2).mean(0) - 1).abs() < 5 * math.sqrt(2 / n))


def test_false_alarm_rate_at_the_chosen_level() -> None:
    """Threshold from one clean prior sample (set A), false-alarm rate on an independent
    one (set B). Each point's exceedance over n independent windows is Binomial; the
    pooled rate over the P correlated points has sd at most sqrt(a(1-a)(1/nA + 1/nB))
    (threshold quantile error + counting error, as if all points in a window were one):
    tolerance 4 sd."""
    prior, valid = _prior()
    far, n = 0.05, 3000
    groups = torch.zeros(2 * n, dtype=torch.long)
    s_a = evidence_scores(prior, _pairs(prior, n, 2), groups, valid)[1::2]
    s_b = evidence_scores(prior, _pairs(prior, n, 3), groups, valid)[1::2]
    thr = threshold_for_far(s_a, far)
    rate = flags(s_b, thr).double().mean()
    assert abs(float(rate) - far) < 4 * math.sqrt(far * (1 - far) * 2 / n)


def test_clean_threshold_and_detection() -> None:
    prior, valid = _prior()
    g = torch.Generator().manual_seed(4)
    thr = clean_threshold(prior, "evidence", 0.01, valid, n_steps=400, generator=g)
    x = prior.destandardize(prior.window.sample(1, 8, g)[0], torch.zeros(8, dtype=torch.long))
    x[3, 7] += 8 * prior.clim_std[7]  # spike
    x[6] = x[5]  # frozen field
    s = evidence_scores(prior, x, torch.zeros(8, dtype=torch.long), valid)
    f = flags(s, thr)
    assert f[3, 7] and int(s[3].argmax()) == 7
    assert bool(f[6].all())  # every point of the frozen step
    d, _ = dte_scores(prior, x, torch.zeros(8, dtype=torch.long))
    assert int(d[3].argmax()) == 7
    imp = imputation_scores(prior, x, torch.zeros(8, dtype=torch.long), n_samples=16, generator=g)
    assert int(imp[3].argmax()) == 7


def test_dte_recovers_the_noise_level() -> None:
    """Inputs x = alpha_t z0 + sigma_t eps (standardised) on a 10x10 grid: E[t | x] is
    within 0.1 of t on average (the posterior over t sharpens with the 100 points)."""
    from models.diffusion.schedules import CosineVP

    prior, _ = _prior(10, 10)
    sched = CosineVP()
    g = torch.Generator().manual_seed(5)
    for t in (0.3, 0.6):
        a, s = sched(torch.tensor(t, dtype=torch.float64))
        z0 = prior.window.sample(20, 1, g)[:, 0]
        zt = a * z0 + s * torch.randn(z0.shape, generator=g, dtype=torch.float64)
        x = prior.destandardize(zt, torch.zeros(20, dtype=torch.long))
        _, t_hat = dte_scores(prior, x, torch.zeros(20, dtype=torch.long), sched)
        assert abs(float(t_hat.mean()) - t) < 0.1


def test_threshold_errors() -> None:
    with pytest.raises(InputError, match="false-alarm rate"):
        threshold_for_far(torch.ones(3), 1.5)
    with pytest.raises(InputError, match="no finite"):
        threshold_for_far(torch.full((3,), float("nan")), 0.1)


def test_detect_cli(tmp_path, capsys) -> None:
    prior, _ = _prior()
    g = torch.Generator().manual_seed(6)
    x = prior.destandardize(prior.window.sample(1, 12, g)[0], torch.zeros(12, dtype=torch.long))
    x[5, 3] += 10 * prior.clim_std[3]
    time = xr.date_range("2000-01-01", periods=12, freq="YS")
    da = xr.DataArray(
        x.numpy().reshape(12, 4, 5).astype(np.float32),
        dims=("time", "lat", "lon"),
        coords={"time": time, "lat": np.linspace(-10, 10, 4), "lon": np.linspace(100, 130, 5)},
        name="t",
    )
    path, out = tmp_path / "in.nc", tmp_path / "scores.nc"
    da.to_dataset().to_netcdf(path)
    ckpt = tmp_path / "prior.pt"
    torch.save(prior.state_dict(), ckpt)
    rc = main(
        [
            "detect",
            str(path),
            "--var",
            "t",
            "--prior",
            str(ckpt),
            "--method",
            "dte",
            "--far",
            "0.01",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    ds = xr.open_dataset(out)
    assert ds["flag"].values[5, 0, 3] == 1 and "t_hat" in ds
    assert (tmp_path / "scores.png").stat().st_size > 0
    v = da.values.copy()
    v[2, 1, 1] = np.nan
    da.copy(data=v).to_dataset().to_netcdf(path)
    assert main(["detect", str(path), "--var", "t", "--out", str(out)]) == 2
    assert "missing values" in capsys.readouterr().err
