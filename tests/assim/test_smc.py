"""The SMC engine: resampling unbiasedness and variance, weights, evidence, collapse."""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.smc import (
    RESAMPLERS,
    SMC,
    WeightCollapse,
    ess,
    get_resampler,
    local_systematic,
    maybe_resample,
    normalize,
    reweight,
    systematic,
)

W = torch.tensor([0.05, 0.30, 0.02, 0.23, 0.40], dtype=torch.float64)
N = 5
REPS = 20000


def _counts(scheme: str, seed: int, device) -> torch.Tensor:
    """Offspring counts ``(REPS, N)`` of ``REPS`` independent resamplings of ``W``
    (one batched call: each row of ``log_w`` is resampled independently)."""
    g = torch.Generator().manual_seed(seed)
    log_w = W.log().to(device).expand(REPS, N)
    idx = RESAMPLERS[scheme](log_w, N, g)
    assert idx.shape == (REPS, N)
    return torch.nn.functional.one_hot(idx.cpu(), N).sum(1).double()


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_resampling_is_unbiased(scheme, device):
    # E[count_i] = N w_i. The mean of REPS i.i.d. counts has s.e. sd_i / sqrt(REPS);
    # 4 s.e. (plus float slack for schemes whose count is almost deterministic).
    c = _counts(scheme, 0, device)
    assert bool((c.sum(1) == N).all())
    se = c.std(0) / math.sqrt(REPS)
    assert bool(((c.mean(0) - N * W).abs() <= 4 * se + 1e-9).all()), (c.mean(0), N * W)


def test_a_biased_scheme_would_be_detected(device):
    # the same statistic rejects resampling from the wrong weights
    g = torch.Generator().manual_seed(1)
    wrong = (W + 0.05).log()
    c = torch.nn.functional.one_hot(RESAMPLERS["multinomial"](wrong.expand(REPS, N), N, g), N)
    c = c.sum(1).double()
    se = c.std(0) / math.sqrt(REPS)
    assert bool(((c.mean(0) - N * W).abs() > 4 * se).any())


def test_systematic_has_lower_variance_than_multinomial(device):
    # multinomial: Var = N w (1 - w) exactly; low-variance schemes keep
    # count_i in {floor(N w_i), ceil(N w_i)} so Var <= 1/4 per component.
    multi = _counts("multinomial", 2, device).var(0)
    torch.testing.assert_close(multi, N * W * (1 - W), rtol=0.1, atol=0.02)
    for scheme in ("systematic", "stratified", "residual"):
        v = _counts(scheme, 3, device).var(0)
        assert float(v.sum()) < float(multi.sum()), scheme
    sys_c = _counts("systematic", 4, device)
    assert bool(((sys_c - torch.floor(N * W)).abs() <= 1).all())


def test_normalize_ess_and_reweight(device):
    log_w = torch.tensor([0.0, -1.0, -math.inf, 2.0], dtype=torch.float64, device=device)
    ln, lse = normalize(log_w)
    torch.testing.assert_close(
        ln.exp().sum(), torch.tensor(1.0, dtype=torch.float64, device=device)
    )
    w = torch.tensor([1.0, math.exp(-1), 0.0, math.exp(2)], dtype=torch.float64)
    assert math.isclose(float(lse), math.log(float(w.sum())), rel_tol=1e-12)
    assert math.isclose(float(ess(log_w)), float(w.sum() ** 2 / (w**2).sum()), rel_tol=1e-12)
    assert float(ess(torch.zeros(7))) == pytest.approx(7.0)
    # evidence increment = log sum_i W_i G_i with W the normalised previous weights
    incr = torch.tensor([0.5, float("nan"), 3.0, -2.0], dtype=torch.float64, device=device)
    new, inc = reweight(log_w, incr)
    Wn = w / w.sum()
    G = torch.tensor([math.exp(0.5), 0.0, math.exp(3.0), math.exp(-2.0)], dtype=torch.float64)
    assert math.isclose(float(inc), math.log(float((Wn * G).sum())), rel_tol=1e-12)
    assert not bool(torch.isnan(new).any())
    assert float(new[1]) == -math.inf and float(new[2]) == -math.inf


def test_collapse_raises_and_never_gives_nan():
    with pytest.raises(WeightCollapse, match="collapsed"):
        reweight(torch.zeros(3), torch.tensor([-math.inf, float("nan"), -math.inf]))
    assert float(ess(torch.full((3,), -math.inf))) == 0.0
    # extreme but finite log-weights: one survivor, ESS 1, no NaN
    new, inc = reweight(torch.zeros(3), torch.tensor([-1e5, -2e5, -3e5], dtype=torch.float64))
    assert float(ess(new)) == pytest.approx(1.0)
    assert math.isfinite(float(inc)) and not bool(torch.isnan(new).any())


def test_maybe_resample_threshold_and_types(gen):
    log_w = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    x = torch.arange(4.0).unsqueeze(1)
    same, lw, done = maybe_resample(x, log_w, threshold=0.0, generator=gen(0))
    assert not done and torch.equal(same, x)
    ens = Ensemble(x, log_w)
    out, lw, done = maybe_resample(ens, log_w, threshold=0.5, generator=gen(0))
    assert done and isinstance(out, Ensemble)
    torch.testing.assert_close(lw, torch.full((4,), -math.log(4)))
    assert bool((out.x == 0).sum() >= 3)
    _, _, done = maybe_resample(x, torch.zeros(4), threshold=1.0, generator=gen(0))
    assert done
    with pytest.raises(InputError, match="resampling scheme"):
        get_resampler("bogus")


def test_smc_evidence_is_unbiased_through_adaptive_resampling():
    # Static model: x ~ N(0, 1), K = 4 conditionally independent y_k ~ N(x, 1).
    # Z = N(y_{1:K}; 0, I + 11^T). An SMC that reweights by N(y_k; x, 1) each step and
    # resamples adaptively (no move) gives an unbiased Z-hat: the mean of
    # exp(log Zhat - log Z) over R = 400 runs is 1 within 4 s.e. (sample sd / sqrt R).
    from scipy import stats

    y = torch.tensor([0.8, 1.4, 0.3, 1.1], dtype=torch.float64)
    K = len(y)
    log_z_true = stats.multivariate_normal(
        torch.zeros(K).numpy(), (torch.eye(K) + torch.ones(K, K)).numpy()
    ).logpdf(y.numpy())
    g = torch.Generator().manual_seed(5)
    ratios = []
    for _ in range(400):
        smc = SMC.uniform(torch.randn(50, generator=g, dtype=torch.float64), threshold=0.5)
        for yk in y:
            smc.reweight(-0.5 * (yk - smc.x) ** 2 - 0.5 * math.log(2 * math.pi))
            smc.resample(g)
        ratios.append(math.exp(smc.log_z - log_z_true))
    r = torch.tensor(ratios)
    assert abs(float(r.mean()) - 1.0) < 4 * float(r.std()) / math.sqrt(len(r))
    assert float(r.std()) > 0


def test_local_systematic_is_systematic_row_by_row_with_a_shared_uniform(device, gen):
    # each row equals smc.systematic fed the same uniform (same generator seed)
    log_w = torch.randn(7, N, generator=gen(0), dtype=torch.float64).to(device) * 2
    log_w[3] = log_w[2]  # equal rows pick equal ancestors: the uniform is shared
    for seed in range(5):
        u = torch.rand((1,), generator=gen(seed), dtype=torch.float64)
        idx = local_systematic(log_w, u)
        assert idx.shape == (7, N)
        for row in range(7):
            assert torch.equal(idx[row], systematic(log_w[row], N, gen(seed))), (seed, row)
        assert torch.equal(idx[2], idx[3])


def test_local_systematic_is_unbiased(device, gen):
    # E[count_{l,i}] = N w_{l,i} for each row over the uniform; REPS = 4000 uniforms, the
    # mean count has s.e. sd / sqrt(REPS): 4 s.e. (+ slack for almost-deterministic counts)
    reps = 4000
    rows = torch.stack([W, W.flip(0), torch.full((N,), 1.0 / N, dtype=torch.float64)])
    g = gen(5)
    counts = torch.stack(
        [
            torch.nn.functional.one_hot(
                local_systematic(rows.log().to(device), torch.rand(1, generator=g)).cpu(), N
            ).sum(1)
            for _ in range(reps)
        ]
    ).double()  # (reps, 3, N)
    se = counts.std(0) / math.sqrt(reps)
    assert bool(((counts.mean(0) - N * rows).abs() <= 4 * se + 1e-9).all())
    wrong = torch.stack([W, W, W])  # the same statistic sees the wrong weights (rows 1, 2)
    assert bool(((counts.mean(0) - N * wrong).abs() > 4 * se + 1e-9).any())
