"""Bootstrap particle filter against the exact Kalman filter on linear-Gaussian models."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.kalman import kalman_filter
from assim.filters.pf import BootstrapPF, _jitter_noise
from assim.obs import GaussianNoise, Observation, Subset
from models.worlds.linear_gaussian import LinearGaussian


def _setting(d: int, every: int, r: float, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = 0.9 * torch.eye(d, dtype=torch.float64) + 0.05 * torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    b = 0.1 * torch.ones(d, dtype=torch.float64)
    Q = 0.5 * torch.eye(d, dtype=torch.float64)
    world = LinearGaussian(A, b, Q)
    obs = Observation(Subset(every=every), GaussianNoise(std=r))
    m0, P0 = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    x = m0 + torch.randn(d, generator=g, dtype=torch.float64)
    ys = []
    for _ in range(K):
        x = world.step(x.unsqueeze(0), g)
        ys.append(obs.sample(x, g)[0])
    ys = torch.stack(ys)
    H = obs.operator.matrix((d,), dtype=torch.float64)
    R = obs.noise.covariance(H.shape[0])
    return world, obs, m0, P0, ys, kalman_filter(A, b, Q, H, R, m0, P0, ys)


def _replicates(world, obs, m0, P0, ys, n, reps, device, seed, **kw):
    """Final weighted mean, variance and log Z-hat of ``reps`` independent PF runs."""
    g = torch.Generator().manual_seed(seed)
    pf = BootstrapPF(**kw)
    L = torch.linalg.cholesky(P0)
    means, variances, log_z = [], [], []
    for _ in range(reps):
        x0 = m0 + torch.randn(n, m0.shape[0], generator=g, dtype=torch.float64) @ L.T
        ens, lz = Ensemble(x0.to(device)), 0.0
        for y in ys:
            ens, info = pf.cycle(world, ens, y.to(device), obs, g)
            lz += info["log_z"]
        means.append(ens.mean().cpu())
        variances.append(ens.var().cpu())
        log_z.append(lz)
    return torch.stack(means), torch.stack(variances), torch.tensor(log_z, dtype=torch.float64)


@pytest.mark.parametrize(
    "d, every, r, n, reps",
    [(2, 1, 1.0, 1000, 40), (10, 5, 2.0, 1000, 40)],
    ids=["d2", "d10"],
)
def test_bootstrap_pf_matches_kalman(d, every, r, n, reps, device):
    world, obs, m0, P0, ys, kf = _setting(d, every, r, K=4, seed=d)
    means, variances, log_z = _replicates(world, obs, m0, P0, ys, n, reps, device, seed=10 + d)
    # Monte-Carlo standard error of the replicate average: sample sd / sqrt(reps).
    # One quantity may sit within 3 s.e. (two-sided 0.27 %); 2d quantities are checked,
    # so the bound is the Student-t (reps - 1 dof) quantile of the same 0.27 % family-wise
    # rate (Bonferroni). The PF bias is O(1 / ESS) relative, far below these s.e. here
    # (ESS >= 900 of N at every cycle in both settings).
    z = stats.t(reps - 1).ppf(1 - 0.0027 / (2 * 2 * d))
    for est, exact in ((means, kf.means[-1]), (variances, torch.diagonal(kf.covs[-1]))):
        se = est.std(0) / math.sqrt(reps)
        assert bool(((est.mean(0) - exact).abs() < z * se).all()), (est.mean(0), exact, se)
    # exp(log Z-hat) is unbiased for Z: the ratio to the exact Kalman evidence averages 1
    ratio = torch.exp(log_z - kf.log_z.sum())
    z1 = stats.t(reps - 1).ppf(1 - 0.0027 / 2)
    assert abs(float(ratio.mean()) - 1.0) < z1 * float(ratio.std()) / math.sqrt(reps)
    # and the estimate is informative: its spread is small (ESS healthy in this setting)
    assert float(log_z.std()) < 0.5


def test_the_comparison_detects_a_wrong_filter(device):
    # the same statistics reject a PF run with the wrong observation noise
    world, obs, m0, P0, ys, kf = _setting(2, 1, 1.0, K=4, seed=2)
    wrong = Observation(obs.operator, GaussianNoise(std=2.0))
    means, variances, _ = _replicates(world, wrong, m0, P0, ys, 1000, 40, device, seed=12)
    se = variances.std(0) / math.sqrt(40)
    assert bool(((variances.mean(0) - torch.diagonal(kf.covs[-1])).abs() > 3 * se).any())


def test_all_nan_observation_skips_the_cycle(gen):
    world, obs, m0, P0, ys, _ = _setting(2, 1, 1.0, K=1, seed=3)
    ens = Ensemble(torch.randn(50, 2, generator=gen(0), dtype=torch.float64))
    out, info = BootstrapPF().cycle(world, ens, torch.full((2,), float("nan")), obs, gen(1))
    assert info["skipped"] and info["log_z"] == 0.0
    torch.testing.assert_close(out.log_w, ens.log_w)


def test_ess_collapse_is_reported_and_weights_never_nan(gen):
    world, obs, *_ = _setting(2, 1, 1.0, K=1, seed=4)
    x = torch.randn(100, 2, generator=gen(0), dtype=torch.float64)
    pf = BootstrapPF(threshold=0.5)
    # a far-away observation: finite but extreme log-likelihoods -> ESS ~ 1
    out, info = pf.analysis(Ensemble(x), torch.tensor([80.0, -80.0]), obs, gen(1))
    assert info["ess"] < 1.5 and info["resampled"] and not info["collapsed"]
    assert math.isfinite(info["log_z"]) and not bool(torch.isnan(out.log_w).any())
    # every particle blown up (NaN state): every weight zero -> collapsed, kept, no NaN
    bad = Ensemble(torch.full((100, 2), float("nan"), dtype=torch.float64))
    out, info = pf.analysis(bad, torch.tensor([0.0, 0.0]), obs, gen(2))
    assert info["collapsed"] and info["log_z"] == -math.inf
    assert not bool(torch.isnan(out.log_w).any())
    # a few NaN particles get weight zero, the rest carry on
    x[:10] = float("nan")
    for filt in (pf, BootstrapPF(threshold=0.5, jitter=0.5)):
        out, info = filt.analysis(Ensemble(x), torch.tensor([0.0, 0.0]), obs, gen(3))
        assert not info["collapsed"] and not bool(torch.isnan(out.x).any())


def test_jitter_covariance_is_the_weighted_ensemble_covariance(gen):
    # sample covariance of 20000 draws; entry s.e. <= sqrt((C_ii C_jj + C_ij^2) / n)
    x = torch.randn(30, 3, generator=gen(0), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]], dtype=torch.float64
    )
    log_w = torch.log_softmax(torch.randn(30, generator=gen(1), dtype=torch.float64), 0)
    w = log_w.exp()
    mu = w @ x
    C = ((x - mu) * w.unsqueeze(1)).T @ (x - mu) / (1 - (w**2).sum())  # unbiased weighted
    se = lambda C: torch.sqrt((torch.outer(C.diagonal(), C.diagonal()) + C**2) / 20000)  # noqa: E731
    draws = _jitter_noise(x, log_w, 20000, "spread", gen(2))
    assert bool(((torch.cov(draws.T) - C).abs() < 4 * se(C)).all())
    # degenerate weights: the equally weighted covariance instead of C = 0
    one = torch.full((30,), -math.inf, dtype=torch.float64)
    one[0] = 0.0
    draws = _jitter_noise(x, one, 20000, "spread", gen(3))
    C1 = torch.cov(x.T)
    assert bool(((torch.cov(draws.T) - C1).abs() < 4 * se(C1)).all())


def test_jitter_moves_only_duplicated_particles(gen):
    world, obs, *_ = _setting(3, 1, 1.0, K=1, seed=5)
    x = torch.randn(30, 3, generator=gen(0), dtype=torch.float64)
    y = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    for jitter_all in (False, True):
        pf = BootstrapPF(threshold=1.0, jitter=0.5, jitter_all=jitter_all)
        out, info = pf.analysis(Ensemble(x), y, obs, gen(3))
        # which new particles coincide with an old one
        kept = (out.x.unsqueeze(1) == x.unsqueeze(0)).all(-1).any(1)
        assert info["resampled"] and torch.unique(out.x, dim=0).shape[0] == 30
        if jitter_all:
            assert not bool(kept.any())
        else:  # particles drawn once are kept as they are, copies are all moved
            assert 0 < int(kept.sum()) < 30


def test_reg_is_jitter_times_scott_bandwidth(gen):
    world, obs, *_ = _setting(3, 1, 1.0, K=1, seed=6)
    x = torch.randn(40, 3, generator=gen(0), dtype=torch.float64)
    y = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    a, _ = BootstrapPF(threshold=1.0, reg=1.5).analysis(Ensemble(x), y, obs, gen(1))
    b, _ = BootstrapPF(threshold=1.0, jitter=1.5 * 40 ** (-1 / 7)).analysis(
        Ensemble(x), y, obs, gen(1)
    )
    torch.testing.assert_close(a.x, b.x)
    with pytest.raises(InputError, match="reg"):
        BootstrapPF(reg=1.0, jitter=0.5)
