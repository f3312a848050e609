"""Background quality control of the evidence scores (:mod:`assim.anomaly_qc`): QC off and
an infinite threshold agree, a rejected observation does not enter the analysis (exact
Gaussian conditional and forecast covariance), the persistence statistic matches a direct
computation and is N(0, 1)-calibrated, false-alarm rate with QC at the chosen level,
calibration factors are 1 on prior draws."""

from __future__ import annotations

import math

import pytest
import torch

from assim.anomaly import (
    evidence_scores,
    flags,
    grid_neighbours,
    predictive,
    threshold_for_far,
)
from assim.anomaly_qc import _buddy_check, calibrate_evidence, persistence_z, qc_filter
from tests.assim.test_anomaly import _prior


def _window(prior, n_steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups = torch.zeros(n_steps, dtype=torch.long)
    return prior.destandardize(prior.window.sample(1, n_steps, g)[0], groups), groups


def test_qc_off_equals_infinite_threshold() -> None:
    """Nothing rejected: the filter's forecast is ``G z_{k-1}`` with covariance ``S``, so
    the scores equal those conditioned on the observed field (two code paths); unit
    calibration factors change nothing."""
    prior, valid = _prior()
    x, groups = _window(prior, 30, 1)
    x[10, 4] += 6 * prior.clim_std[4]
    ref = evidence_scores(prior, x, groups, valid, qc=None, persist=1)
    inf = evidence_scores(prior, x, groups, valid, qc=math.inf, persist=1)
    assert torch.allclose(ref, inf, rtol=0, atol=1e-10)
    ones = dict(innov=1.0, loo=1.0, block=1.0, marginal=1.0, persist1=1.0, persist2=1.0)
    ones["persist3"] = 1.0
    for qc, persist in ((None, 1), (4.0, 3)):
        a = evidence_scores(prior, x, groups, valid, qc=qc, persist=persist)
        b = evidence_scores(prior, x, groups, valid, qc=qc, persist=persist, scales=ones)
        assert torch.equal(a, b)


def test_rejected_observation_does_not_change_the_analysis(device) -> None:
    """A spike of 20 or 40 sd at (3, 7) is rejected; the analysis and every later
    innovation are the same for both sizes (the value does not enter). The analysis at
    step 3 is the Gaussian conditional of the rejected points on the accepted ones under
    N(G z_2, S), and the forecast covariance of step 4 is ``S + G_R A G_R^T``, ``A`` the
    conditional covariance (dense closed forms, against the Woodbury update)."""
    prior, _ = _prior()
    gain, s = (a.to(device) for a in predictive(prior))
    sig = prior.window.spatial_cov().to(device)
    x, groups = _window(prior, 8, 2)
    z = prior.standardize(x, groups).to(device)
    runs = []
    for amp in (20.0, 40.0):
        zz = z.clone()
        zz[3, 7] += amp
        runs.append(qc_filter(gain, s, sig, zz, 4.0))
    a, b = runs
    assert a.rejected[3, 7] and not a.rejected[2].any() and not a.rejected[4:].any()
    assert torch.allclose(a.analysis, b.analysis, rtol=0, atol=1e-12)
    assert torch.allclose(a.innov[4:], b.innov[4:], rtol=0, atol=1e-12)
    rej = a.rejected[3]
    acc = ~rej
    m = z[2] @ gain.T
    cond = m[rej] + s[rej][:, acc] @ torch.linalg.solve(s[acc][:, acc], z[3, acc] - m[acc])
    assert torch.allclose(a.analysis[3, rej], cond, atol=1e-10)
    assert torch.equal(a.analysis[3, acc], z[3, acc])
    cov = s[rej][:, rej] - s[rej][:, acc] @ torch.linalg.solve(s[acc][:, acc], s[acc][:, rej])
    f4 = s + gain[:, rej] @ cov @ gain[:, rej].T
    assert torch.allclose(a.cov_diag[4], torch.diagonal(f4), atol=1e-10)
    assert torch.allclose(a.precision(4), torch.linalg.inv(f4), atol=1e-8)
    assert torch.allclose(a.innov[4], z[4] - a.analysis[3] @ gain.T, atol=1e-12)


def test_persistence_matches_direct_windows_and_is_standard_normal(device) -> None:
    """Running sums against explicit windows; with ``S = I`` and iid N(0, 1) innovations
    the standardised 3x3 block mean ``u`` is N(0, 1), so ``|W_2| > 1.96`` has probability
    0.05 at every step: over n = 6000 x 25 values (points' blocks overlap, so count the
    worst case of 6000 / 1 independent values per point block: sd sqrt(.05 .95 / 6000) =
    0.0028, and the 25 points average to at most that), tolerance 4 sd."""
    g = torch.Generator(device=device).manual_seed(3)
    t, n = 6000, 5
    valid = torch.ones(n, n, dtype=torch.bool).numpy()
    nb = grid_neighbours(valid, True).to(device)
    nu = torch.randn(t, n * n, generator=g, device=device, dtype=torch.float64)
    eye = torch.eye(n * n, device=device, dtype=torch.float64)
    ok = nb >= 0  # the grid is periodic in x only: edge blocks have 6 points
    u = (nu[:, nb.clamp_min(0)] * ok).sum(-1) / ok.sum(1).sqrt()  # block mean / (sqrt(n) / n)
    out = persistence_z(nu, eye, nb, 3)
    direct = torch.stack(
        [
            u[2:].abs(),
            (u[2:] + u[1:-1]).abs() / math.sqrt(2),
            (u[2:] + u[1:-1] + u[:-2]).abs() / math.sqrt(3),
        ]
    )
    assert torch.allclose(out[2:], direct.max(0).values, atol=1e-12)
    assert torch.allclose(out[0], u[0].abs(), atol=1e-12)
    first2 = torch.maximum(u[1].abs(), (u[1] + u[0]).abs() / math.sqrt(2))
    assert torch.allclose(out[1], first2, atol=1e-12)
    w2 = (u[1:] + u[:-1]) / math.sqrt(2)
    frac = float((w2.abs() > 1.959964).double().mean())
    assert abs(frac - 0.05) < 4 * math.sqrt(0.05 * 0.95 / t)


@pytest.mark.slow
def test_false_alarm_rate_with_qc_and_persistence() -> None:
    """Default scores (QC, persistence): threshold from the last step of n independent
    prior windows of 3 steps (set A), false-alarm rate on an independent set B, as in
    test_anomaly: sd at most sqrt(a(1 - a)(1/nA + 1/nB)), tolerance 4 sd."""
    prior, valid = _prior()
    far, n = 0.05, 500
    sets = []
    for seed in (10, 11):
        z = prior.window.sample(n, 3, torch.Generator().manual_seed(seed))
        groups = torch.zeros(3, dtype=torch.long)
        sets.append(
            torch.stack(
                [
                    evidence_scores(prior, prior.destandardize(w, groups), groups, valid)[-1]
                    for w in z
                ]
            )
        )
    thr = threshold_for_far(sets[0], far)
    rate = float(flags(sets[1], thr).double().mean())
    assert abs(rate - far) < 4 * math.sqrt(far * (1 - far) * 2 / n)


def test_calibration_factors_are_one_on_prior_draws() -> None:
    """On a prior window of T = 600 steps the innovations are N(0, F) and (to the rare QC
    rejections) white in time: the mean of T x P chi2_1 values has sd at most sqrt(2 / T)
    (all points fully correlated) = 0.058; tolerance 4 sd. Without QC, anomalies half as
    large give exactly a quarter of each factor."""
    prior, valid = _prior()
    x, groups = _window(prior, 600, 12)
    sc = calibrate_evidence(prior, x, groups, valid)
    tol = 4 * math.sqrt(2 / 600)
    for key in ("innov", "loo", "persist1", "persist2", "persist3"):
        assert abs(sc[key] - 1) < tol, (key, sc[key])
    xm = prior.clim_mean[0]
    full = calibrate_evidence(prior, x, groups, valid, qc=None)
    half = calibrate_evidence(prior, xm + (x - xm) / 2, groups, valid, qc=None)
    for key in ("innov", "loo", "persist1", "persist3", "marginal"):
        assert math.isclose(half[key], full[key] / 4, rel_tol=1e-9), key


def test_buddy_check_is_the_leave_one_out_among_accepted(device) -> None:
    """The buddy statistic equals ``(P r_A)_i / sqrt(P_ii)`` with ``P = ((Q^{-1})_AA)^{-1}``
    computed densely (the precision of the accepted points' marginal); thresholds at
    quantiles of the dense statistic flag exactly the same points."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 50, generator=g, dtype=torch.float64)
    q = (a @ a.T + 50 * torch.eye(50, dtype=torch.float64)).to(device)
    r = (3 * torch.randn(50, generator=g, dtype=torch.float64)).to(device)
    bad = torch.zeros(50, dtype=torch.bool, device=device)
    bad[[3, 7, 20]] = True
    acc = ~bad
    p = torch.linalg.inv(torch.linalg.inv(q)[acc][:, acc])
    stat = (p @ r[acc]).abs() / torch.diagonal(p).sqrt()
    for lev in (0.1, 0.3, 0.5, 0.7, 0.9):
        thr = float(stat.quantile(lev))
        ref = torch.zeros_like(bad)
        ref[acc] = stat > thr
        assert torch.equal(_buddy_check(q, r, bad, thr), ref)
