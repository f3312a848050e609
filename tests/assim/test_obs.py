"""Observation operators, noise models and likelihoods against closed forms / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from assim.errors import InputError
from assim.obs import (
    Coarsen,
    GaussianNoise,
    Identity,
    Linear,
    Mask,
    Observation,
    Pointwise,
    StudentTNoise,
    Subset,
    make_observation,
    parse_operator,
)
from assim.obs_noise import standard_gamma


def _spd(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, m, generator=g, dtype=torch.float64)
    return B @ B.T + 0.5 * torch.eye(m, dtype=torch.float64)


# ---------------------------------------------------------------- operators


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("identity", (12,)),
        ("every:4", (12,)),
        ("every:4", (8, 12)),
        ("stride:5", (8, 12)),
        ("coarsen:4", (12,)),
        ("coarsen:4", (8, 12)),
    ],
)
def test_linear_operators_equal_their_matrix(spec, shape, device, gen):
    op = parse_operator(spec)
    x = torch.randn(3, *shape, generator=gen(0), dtype=torch.float64).to(device)
    H = op.matrix(shape, dtype=torch.float64, device=device)
    assert op.linear
    assert H.shape == (op.out_dim(shape), math.prod(shape))
    torch.testing.assert_close(op(x), x.reshape(3, -1) @ H.T)
    assert op.coords(shape).shape == (H.shape[0], len(shape))


def test_every_and_coarsen_values_and_coords():
    x = torch.arange(2 * 8 * 12, dtype=torch.float64).reshape(2, 8, 12)
    torch.testing.assert_close(Subset(every=4)(x), x[:, ::4, ::4].reshape(2, -1))
    torch.testing.assert_close(Subset(stride=5)(x), x.reshape(2, -1)[:, ::5])
    blocks = x.numpy().reshape(2, 2, 4, 3, 4).mean(axis=(2, 4)).reshape(2, -1)
    torch.testing.assert_close(Coarsen(4)(x), torch.from_numpy(blocks))
    # block centres in index units: rows 0..3 -> 1.5, columns 4..7 -> 5.5
    c = Coarsen(4).coords((8, 12))
    torch.testing.assert_close(c[1], torch.tensor([1.5, 5.5], dtype=torch.float64))
    torch.testing.assert_close(
        Subset(every=4).coords((8, 12))[4], torch.tensor([4.0, 4.0], dtype=torch.float64)
    )
    x1 = torch.arange(40.0).reshape(1, 40)
    torch.testing.assert_close(Subset(every=4)(x1), x1[:, ::4])
    torch.testing.assert_close(
        Subset(every=4).coords((40,)).reshape(-1), torch.arange(0, 40, 4).double()
    )


def test_mask_subset_and_linear():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(Mask(mask)(x), x[:, mask])
    torch.testing.assert_close(
        Mask(mask).coords((4, 5)), torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    )
    with pytest.raises(InputError, match="mask"):
        Mask(mask)(torch.randn(2, 5, 4))
    H = torch.randn(3, 20)
    torch.testing.assert_close(Linear(H)(x), x.reshape(2, -1) @ H.T)
    with pytest.raises(InputError, match="columns"):
        Linear(H)(torch.randn(2, 7))
    torch.testing.assert_close(Subset([3, 7])(x), x.reshape(2, -1)[:, [3, 7]])


@pytest.mark.parametrize("func", ["arctan", "saturating", "cubic"])
def test_pointwise_values_and_jacobian(func, device, gen):
    f = {"arctan": np.arctan, "saturating": lambda w: w / (1 + np.abs(w)), "cubic": lambda w: w**3}
    op = parse_operator(f"{func},every:2")
    assert isinstance(op, Pointwise) and not op.linear
    x = torch.randn(3, 10, generator=gen(1), dtype=torch.float64).to(device)
    want = f[func](x.cpu().numpy()[:, ::2])
    np.testing.assert_allclose(op(x).cpu().numpy(), want, rtol=1e-12)
    J = op.jacobian(x)
    for i in range(3):
        Ji = torch.autograd.functional.jacobian(lambda v: op(v.unsqueeze(0))[0], x[i])
        torch.testing.assert_close(J[i], Ji)
    with pytest.raises(InputError, match="nonlinear"):
        op.matrix((10,))


def test_parse_operator_grammar_and_errors():
    assert isinstance(parse_operator("identity"), Identity)
    assert parse_operator("arctan,every:2").spec == parse_operator("every:2,arctan").spec
    assert parse_operator("arctan").spec == "arctan"
    rebuilt = parse_operator(parse_operator("saturating,coarsen:8").spec)
    assert isinstance(rebuilt.base, Coarsen) and rebuilt.funcs == ["saturating"]
    for bad in ["", "every:0", "every:x", "coarsen:2,every:4", "sine", "every"]:
        with pytest.raises(InputError, match="operator"):
            parse_operator(bad)


# ---------------------------------------------------------------- noise / likelihood


def test_gaussian_full_R_log_likelihood_matches_scipy(device, gen):
    R = _spd(5, 0)
    obs = Observation(Subset(every=2), GaussianNoise(R=R))
    x = torch.randn(7, 10, generator=gen(2), dtype=torch.float64).to(device)
    y = torch.randn(5, generator=gen(3), dtype=torch.float64).to(device)
    got = obs.log_likelihood(y, x).cpu().numpy()
    hx = x.cpu().numpy()[:, ::2]
    want = [stats.multivariate_normal(hx[i], R.numpy()).logpdf(y.cpu().numpy()) for i in range(7)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("kind", ["scalar_std", "diag_var"])
def test_gaussian_diagonal_matches_scipy(kind, gen):
    std = torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    noise = GaussianNoise(std=0.7) if kind == "scalar_std" else GaussianNoise(var=std**2)
    s = np.full(4, 0.7) if kind == "scalar_std" else std.numpy()
    r = torch.randn(6, 4, generator=gen(4), dtype=torch.float64)
    want = stats.norm(0, s).logpdf(r.numpy()).sum(-1)
    np.testing.assert_allclose(noise.log_prob(r).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(noise.covariance(4).numpy(), np.diag(s**2), rtol=1e-6)


def test_student_t_matches_scipy(gen):
    noise = StudentTNoise(torch.tensor([0.5, 2.0, 1.0]), df=3.5)
    r = torch.randn(6, 3, generator=gen(5), dtype=torch.float64) * 3
    want = stats.t(df=3.5, scale=[0.5, 2.0, 1.0]).logpdf(r.numpy()).sum(-1)
    np.testing.assert_allclose(noise.log_prob(r).numpy(), want, rtol=1e-6)


def test_nan_entries_equal_the_observed_subset_likelihood(gen):
    R = _spd(6, 1)
    obs = Observation(Identity(), GaussianNoise(R=R))
    x = torch.randn(4, 6, generator=gen(6), dtype=torch.float64)
    y = torch.randn(6, generator=gen(7), dtype=torch.float64)
    y[[1, 4]] = float("nan")
    seen = obs.observed(y)
    sub = obs.subset(seen)
    got = obs.log_likelihood(y, x)
    torch.testing.assert_close(got, sub.log_likelihood(y[seen], x))
    keep = [0, 2, 3, 5]
    # the marginal of the observed block (not the conditional): scipy on R[keep][:, keep]
    want = stats.multivariate_normal(np.zeros(4), R.numpy()[np.ix_(keep, keep)]).logpdf(
        (y[keep] - x[:, keep]).numpy()
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    torch.testing.assert_close(
        sub.operator.matrix((6,), dtype=torch.float64), torch.eye(6, dtype=torch.float64)[keep]
    )
    # all unobserved: log-likelihood 0 (no information)
    assert torch.equal(obs.log_likelihood(torch.full((6,), float("nan")), x), torch.zeros(4))


def test_student_t_nan_and_diag_marginal(gen):
    obs = Observation(Identity(), StudentTNoise(torch.tensor([1.0, 2.0, 3.0]), 4.0))
    x = torch.randn(5, 3, generator=gen(8), dtype=torch.float64)
    y = torch.tensor([0.3, float("nan"), -1.0], dtype=torch.float64)
    want = stats.t(df=4.0, scale=[1.0, 3.0]).logpdf(y[[0, 2]].numpy() - x[:, [0, 2]].numpy())
    np.testing.assert_allclose(obs.log_likelihood(y, x).numpy(), want.sum(-1), rtol=1e-6)


def test_bad_noise_and_mis_shaped_y_raise_clear_errors():
    with pytest.raises(InputError, match="R is not positive definite"):
        GaussianNoise(R=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(InputError, match="symmetric"):
        GaussianNoise(R=torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(InputError, match="square"):
        GaussianNoise(R=torch.ones(2, 3))
    with pytest.raises(InputError, match="std"):
        GaussianNoise(std=-1.0)
    with pytest.raises(InputError, match="df"):
        StudentTNoise(1.0, df=0.0)
    obs = make_observation("every:4", sigma=1.0)
    x = torch.randn(3, 40)
    with pytest.raises(InputError, match=r"observation y has shape \(9,\)"):
        obs.log_likelihood(torch.zeros(9), x)
    with pytest.raises(InputError, match="observations"):
        Observation(Identity(), GaussianNoise(var=torch.ones(3))).log_likelihood(
            torch.zeros(4), torch.randn(2, 4)
        )


# ---------------------------------------------------------------- sampling


def test_gaussian_sample_covariance(gen):
    # sample covariance of n = 20000 draws: entry s.e. <= sqrt((R_ii R_jj + R_ij^2) / n)
    R = _spd(3, 2)
    obs = Observation(Identity(), GaussianNoise(R=R))
    x = torch.zeros(20000, 3, dtype=torch.float64)
    y = obs.sample(x, gen(9))
    C = torch.cov(y.T)
    se = torch.sqrt((torch.outer(R.diagonal(), R.diagonal()) + R**2) / 20000)
    assert bool(((C - R).abs() < 4 * se).all())


def test_student_t_and_gamma_samples_follow_their_law(gen):
    # Kolmogorov-Smirnov with a fixed seed: a wrong sampler gives p ~ 0 at n = 4000
    draws = StudentTNoise(2.0, df=2.5).sample((4000, 1), gen(10), dtype=torch.float64)
    assert stats.kstest(draws[:, 0].numpy(), stats.t(df=2.5, scale=2.0).cdf).pvalue > 1e-3
    for a in (0.4, 3.0):
        g = standard_gamma(torch.full((4000,), a, dtype=torch.float64), gen(11))
        assert stats.kstest(g.numpy(), stats.gamma(a).cdf).pvalue > 1e-3
    # the observation's sample is h(x) + noise
    obs = make_observation("arctan", sigma=1e-9)
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(obs.sample(x, gen(12)), torch.atan(x), atol=1e-7, rtol=0)
