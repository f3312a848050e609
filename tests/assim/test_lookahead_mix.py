"""The adaptive-mixture look-ahead filter (:mod:`assim.lookahead_mix`) against exact references.

Linear-Gaussian window model as in ``test_dpf_l63_lookahead.py``: ``F(x) = A x``, model
error injected at the first of ``L`` steps, ``y = H x_L + N(0, R)``; with the mixture
model error ``(1 - a) N(0, q^2 I) + a N(0, kappa^2 q^2 I)`` every quantity has a closed
form (a Gaussian mixture, one Kalman filter per sequence of components).
"""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf_local import scale_anomalies
from assim.filters.kalman import kalman_update
from assim.lookahead import LookaheadPF, PhysicalFlow
from assim.lookahead_mix import AdaptiveMixLookahead
from assim.obs import GaussianNoise, Linear, Observation

F64 = torch.float64
D, L, Q, KAPPA = 3, 4, 0.4, 3.0


class _LinearSim:
    def __init__(self, A: torch.Tensor) -> None:
        self.A = A

    def deterministic_step(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T.to(x)


def _setup(device):
    """``(flow, obs, AL, QL, H, R)``: ``x_L = AL x_0 + A^{L-1} eta``, ``eta ~ N(0, q^2 I)``
    (``QL = q^2 A^{L-1} A^{L-1,T}``)."""
    g = torch.Generator().manual_seed(0)
    A = torch.linalg.matrix_exp(0.1 * torch.randn(D, D, generator=g, dtype=F64)).to(device)
    H = torch.randn(2, D, generator=g, dtype=F64).to(device)
    obs = Observation(Linear(H), GaussianNoise(std=0.5))
    AL1 = torch.linalg.matrix_power(A, L - 1)
    QL = Q**2 * AL1 @ AL1.T
    r_mat = 0.25 * torch.eye(2, dtype=F64, device=device)
    return PhysicalFlow(_LinearSim(A)), obs, torch.linalg.matrix_power(A, L), QL, H, r_mat


def _observations(AL, QL, H, device, k=4, jumps=(1,), size=3.0):
    """``k`` observations of the window model; the windows ``jumps`` have a ``size``
    times larger model error."""
    g = torch.Generator().manual_seed(3)
    chol = torch.linalg.cholesky(QL).cpu()
    x, ys = torch.randn(D, generator=g, dtype=F64), []
    for i in range(k):
        x = AL.cpu() @ x + (size if i in jumps else 1.0) * chol @ torch.randn(
            D, generator=g, dtype=F64
        )
        ys.append(H.cpu() @ x + 0.5 * torch.randn(2, generator=g, dtype=F64))
    return torch.stack(ys).to(device)


def _filter(mix, mix_max, beta=1.0, **kw):
    pf = LookaheadPF(q=Q, mix=mix, mix_scale=KAPPA, **kw)
    return AdaptiveMixLookahead(pf, mix, mix_max, beta)


def _run(filt, flow, obs, ys, n, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    ens = Ensemble(torch.randn(n, D, generator=g, dtype=F64, device=device))
    out = []
    for y in ys:
        ens, info = filt.window(flow, ens, y, obs, L, g)
        out.append((ens, info))
    return out


def test_constant_mixture_is_the_fixed_mixture_bit_for_bit(device):
    """``mix_min == mix_max``: the same particles, weights and evidence as
    ``LookaheadPF(mix=...)`` with the same generator, window after window."""
    flow, obs, AL, QL, H, _ = _setup(device)
    ys = _observations(AL, QL, H, device)
    fixed = _run(LookaheadPF(q=Q, mix=0.1, mix_scale=KAPPA), flow, obs, ys, 64, 1, device)
    adapt = _run(_filter(0.1, 0.1), flow, obs, ys, 64, 1, device)
    for (e1, i1), (e2, i2) in zip(fixed, adapt, strict=True):
        assert torch.equal(e1.x, e2.x) and torch.equal(e1.log_w, e2.log_w)
        assert i1["log_z"] == i2["log_z"] and i2["mix"] == 0.1


def test_the_mixture_weight_depends_on_the_past_only(device):
    """An outlier in window 2 leaves the weights used in windows 0-2 unchanged and drives
    window 3's weight to the cap (the wide component then explains the data, r ~ 1)."""
    flow, obs, AL, QL, H, _ = _setup(device)
    ys = _observations(AL, QL, H, device, jumps=())
    ys_out = ys.clone()
    ys_out[2] += 8.0  # 16 noise sd
    a = [i["mix"] for _, i in _run(_filter(0.02, 0.4), flow, obs, ys, 128, 2, device)]
    b = [i["mix"] for _, i in _run(_filter(0.02, 0.4), flow, obs, ys_out, 128, 2, device)]
    assert a[0] == b[0] == 0.02
    assert a[:3] == b[:3]
    assert a[3] < 0.2 and b[3] == 0.4


def test_wide_probability_matches_the_closed_form(device):
    """One window from a single ancestor ``x_0``: the posterior probability of the wide
    component is ``a Z_w / (a Z_w + (1 - a) Z_n)``, ``Z_c = N(y; H AL x_0, H c QL H^T + R)``.
    With one Gauss–Newton pass the proposal is the exact posterior mixture and all weights
    are equal, so ``wide_prob`` is the mean of ``P(wide | x_i)`` in ``[0, 1]`` over ``N``
    independent posterior draws: its sd is at most ``sqrt(p (1 - p) / N)``; 4 sd."""
    flow, obs, AL, QL, H, r_mat = _setup(device)
    x0 = torch.tensor([0.5, -0.2, 0.1], dtype=F64, device=device)
    y = H @ AL @ x0 + torch.tensor([1.6, -1.2], dtype=F64, device=device)
    a, n = 0.2, 5000
    lz = [
        torch.distributions.MultivariateNormal(H @ AL @ x0, H @ (c * QL) @ H.T + r_mat).log_prob(y)
        for c in (1.0, KAPPA**2)
    ]
    p = float(1 / (1 + (1 - a) / a * torch.exp(lz[0] - lz[1])))
    filt = _filter(a, a, ess_threshold=0.0)
    g = torch.Generator(device=device).manual_seed(4)
    _, info = filt.window(flow, Ensemble(x0.expand(n, D).clone()), y, obs, L, g)
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(info["wide_prob"] - p) <= tol
    assert abs(p - a) > 5 * tol  # the data moved it: the check can tell r from the prior
    _, info0 = LookaheadPF(q=Q).window(flow, Ensemble(x0.expand(8, D).clone()), y, obs, L, g)
    assert info0["wide_prob"] == 0.0  # no mixture: no wide component


def _exact_means(AL, QL, H, r_mat, ys, mixes):
    """Exact posterior means of the window model whose mixture weight in window ``k`` is
    ``mixes[k]`` (``2^K`` Kalman filters weighted by their evidence)."""
    comps = [(0.0, torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64))]
    out = []
    for y, a in zip(ys, mixes, strict=True):
        new = []
        for lw, m, P in comps:
            for pc, sc in ((1 - a, 1.0), (a, KAPPA**2)):
                ma, Pa, lz = kalman_update(AL @ m, AL @ P @ AL.T + sc * QL, y, H, r_mat)
                new.append((lw + math.log(pc) + float(lz), ma, Pa))
        comps = new
        w = torch.softmax(torch.tensor([c[0] for c in comps], dtype=F64), 0)
        out.append(sum(wi * c[1] for wi, c in zip(w, comps, strict=True)))
    return torch.stack(out)


def test_weights_are_exact_for_the_data_dependent_model():
    """30 independent runs (200 particles, prior N(0, I), 12x model-error jumps in windows 1
    and 2): each run's posterior means minus the exact means of the model with *that
    run's* mixture weights have mean 0 within 3.5 MC s.e. (se = std / sqrt(30); a t_29
    beyond 3.5 has p ~ 1.5e-3, Bonferroni over 3 windows x 3 components). The same check
    against the fixed-weight model (``mix_min`` throughout) fails: the adaptive weights
    change the model, and the test can tell."""
    flow, obs, AL, QL, H, r_mat = _setup("cpu")
    ys = _observations(AL, QL, H, "cpu", k=3, jumps=(1, 2), size=12.0)
    diffs, diffs_fixed = [], []
    for s in range(30):
        res = _run(_filter(0.02, 0.6), flow, obs, ys, 200, 10 + s, "cpu")
        means = torch.stack([e.mean() for e, _ in res])
        mixes = [i["mix"] for _, i in res]
        diffs.append(means - _exact_means(AL, QL, H, r_mat, ys, mixes))
        diffs_fixed.append(means - _exact_means(AL, QL, H, r_mat, ys, [0.02] * 3))
    for dd, ok in ((torch.stack(diffs), True), (torch.stack(diffs_fixed), False)):
        se = dd.std(0) / math.sqrt(30)
        assert bool((dd.mean(0).abs() <= 3.5 * se + 1e-12).all()) is ok


def test_deflation_scales_the_analysis_anomalies(device):
    """``spread_factor = beta``: the analysis is ``scale_anomalies`` of the undeflated one
    (same generator), so the weighted mean is kept and the weighted variance is ``beta^2``
    times; ``beta = 1`` is the undeflated filter bit for bit."""
    flow, obs, AL, QL, H, _ = _setup(device)
    y = _observations(AL, QL, H, device)[0]
    x0 = torch.randn(64, D, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)
    out = {}
    for beta in (1.0, 0.8):
        g = torch.Generator(device=device).manual_seed(6)
        out[beta] = _filter(0.1, 0.1, beta).window(flow, Ensemble(x0), y, obs, L, g)
    g = torch.Generator(device=device).manual_seed(6)
    ref, _ = LookaheadPF(q=Q, mix=0.1, mix_scale=KAPPA).window(flow, Ensemble(x0), y, obs, L, g)
    assert torch.equal(out[1.0][0].x, ref.x)
    want = scale_anomalies(ref, 0.8)
    torch.testing.assert_close(out[0.8][0].x, want.x)
    torch.testing.assert_close(out[0.8][0].mean(), ref.mean())
    torch.testing.assert_close(out[0.8][0].var(), 0.64 * ref.var())
    assert out[0.8][1]["spread_factor"] == 0.8


def test_next_mix_and_bad_options():
    filt = _filter(0.05, 0.3)
    assert filt.next_mix(0.01) == 0.05 and filt.next_mix(0.2) == 0.2
    assert filt.next_mix(0.9) == 0.3 and filt.next_mix(math.nan) == 0.3
    filt.mix = 0.2
    filt.reset()
    assert filt.mix == 0.05 and filt.history == []
    pf = LookaheadPF(q=Q, mix=0.1)
    for bad in [(0.0, 0.1), (0.2, 0.1), (0.1, 1.0), (math.nan, 0.1)]:
        with pytest.raises(InputError, match="mix_min"):
            AdaptiveMixLookahead(pf, *bad)
    for beta in (0.0, 1.5, math.nan):
        with pytest.raises(InputError, match="spread_factor"):
            AdaptiveMixLookahead(pf, 0.1, 0.2, beta)
    with pytest.raises(InputError, match="LookaheadPF"):
        AdaptiveMixLookahead(object(), 0.1, 0.2)  # type: ignore[arg-type]
