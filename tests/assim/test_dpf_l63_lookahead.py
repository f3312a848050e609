"""The look-ahead window particle filter (:mod:`assim.lookahead`) against exact references.

Linear-Gaussian window model: ``F(x) = A x`` (deterministic), injection kernel
``N(A x, q^2 I)`` at the first step of a window of ``L`` steps, linear observation
``y = H x_L + N(0, R)``. Over a window the model is again linear-Gaussian,
``x_L = A^L x_0 + A^{L-1} eta``, so the Kalman filter on ``(A^L, A^{L-1} q^2 A^{L-1,T})``
is the exact posterior, and with one Gauss–Newton pass the proposal is the exact
optimal proposal: every incremental weight equals the predictive likelihood
``N(y; H A^L x_0, H A^{L-1} q^2 A^{L-1,T} H^T + R)`` of its ancestor.
"""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.kalman import kalman_filter
from assim.lookahead import LookaheadPF, PhysicalFlow, fd_jacobian
from assim.obs import Cubic, GaussianNoise, Linear, Observation

F64 = torch.float64


class _LinearSim:
    def __init__(self, A: torch.Tensor) -> None:
        self.A = A

    def deterministic_step(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T.to(x)


def _setup(d: int = 3, L: int = 4, q: float = 0.4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.matrix_exp(0.1 * torch.randn(d, d, generator=g, dtype=F64))
    H = torch.randn(2, d, generator=g, dtype=F64)
    obs = Observation(Linear(H), GaussianNoise(std=0.5))
    AL1 = torch.linalg.matrix_power(A, L - 1)
    return A, H, obs, torch.linalg.matrix_power(A, L), q**2 * AL1 @ AL1.T, L, q


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_fd_jacobian_is_exact_for_a_linear_flow(scheme):
    A, *_ = _setup()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    fx, jac = fd_jacobian(PhysicalFlow(_LinearSim(A)), x, 3, 0.1, scheme)
    A3 = torch.linalg.matrix_power(A, 3)
    torch.testing.assert_close(fx, x @ A3.T)
    torch.testing.assert_close(jac, A3.expand(5, 3, 3))


class _SquareSim:
    def deterministic_step(self, x: torch.Tensor) -> torch.Tensor:
        return x**2


def test_fd_jacobian_closed_forms_for_a_quadratic_flow():
    """``F(x) = x^2`` (elementwise): central differences give ``diag(2x)`` exactly, forward
    differences ``diag(2x + eps)`` exactly (their O(eps) error, in closed form)."""
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    eps = 0.1
    _, jc = fd_jacobian(PhysicalFlow(_SquareSim()), x, 1, eps, "central")
    fx, jf = fd_jacobian(PhysicalFlow(_SquareSim()), x, 1, eps, "forward")
    torch.testing.assert_close(fx, x**2)
    torch.testing.assert_close(jc, torch.diag_embed(2 * x))
    torch.testing.assert_close(jf, torch.diag_embed(2 * x + eps))
    with pytest.raises(InputError):
        fd_jacobian(PhysicalFlow(_SquareSim()), x, 1, eps, "backward")


@pytest.mark.parametrize(
    ("inject", "linearise", "fd"),
    [
        ("first", "particle", "central"),
        ("last", "particle", "central"),
        ("first", "mean", "central"),
        ("first", "particle", "forward"),
    ],  # fmt: skip
)
def test_weights_equal_the_predictive_likelihood(inject, linearise, fd):
    """Optimal proposal of a linear window: the incremental weight is ``p(y | x_0)`` exactly
    (this fails for a wrong proposal density, a wrong Jacobian or a wrong flow length)."""
    A, H, obs, AL, QL, L, q = _setup()
    if inject == "last":
        QL = q**2 * torch.eye(3, dtype=F64)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 3, generator=g, dtype=F64)
    y = torch.tensor([0.3, -1.0], dtype=F64)
    filt = LookaheadPF(q=q, inject=inject, iters=1, ess_threshold=0.0, linearise=linearise, fd=fd)
    ens, info = filt.window(PhysicalFlow(_LinearSim(A)), Ensemble(x0), y, obs, L, g)
    pred = torch.distributions.MultivariateNormal(
        x0 @ AL.T @ H.T, H @ QL @ H.T + 0.25 * torch.eye(2, dtype=F64)
    ).log_prob(y)
    torch.testing.assert_close(ens.log_w, torch.log_softmax(pred, 0))
    assert info["log_z"] == pytest.approx(float(torch.logsumexp(pred, 0) - math.log(64)))


def _run(filt, A, obs, ys, L, n, seed):
    g = torch.Generator().manual_seed(seed)
    ens = Ensemble(torch.randn(n, 3, generator=g, dtype=F64))
    means, logz = [], 0.0
    for y in ys:
        ens, info = filt.window(PhysicalFlow(_LinearSim(A)), ens, y, obs, L, g)
        means.append(ens.mean())
        logz += info["log_z"]
    return torch.stack(means), logz


def _linear_case():
    """The linear-Gaussian window problem of :func:`_setup`, 4 observations and its exact
    Kalman filter: ``(A, obs, L, q, ys, kf)``."""
    A, H, obs, AL, QL, L, q = _setup()
    g = torch.Generator().manual_seed(3)
    x, ys = torch.randn(3, generator=g, dtype=F64), []
    chol = torch.linalg.cholesky(QL)
    for _ in range(4):
        x = AL @ x + chol @ torch.randn(3, generator=g, dtype=F64)
        ys.append(H @ x + 0.5 * torch.randn(2, generator=g, dtype=F64))
    ys = torch.stack(ys)
    kf = kalman_filter(AL, None, QL, H, 0.25 * torch.eye(2, dtype=F64),
                       torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64), ys)  # fmt: skip
    return A, obs, L, q, ys, kf


@pytest.mark.parametrize(("iters", "inflation"), [(0, 1.0), (2, 1.0), (1, 2.0)])
def test_posterior_mean_and_evidence_match_kalman(iters, inflation):
    """Posterior means within 3.5 MC s.e. (R = 40 independent runs, se = std_r / sqrt(R),
    Bonferroni over 4 cycles x 3 components at ~3.5 sigma for a t_39 quantile) and
    ``E[Z_hat / Z] = 1`` within 3 se. ``iters = 0`` (bootstrap through the window) checks
    the proposal density is not needed for consistency; ``iters = 2`` re-linearises."""
    A, obs, L, q, ys, kf = _linear_case()
    filt = LookaheadPF(q=q, iters=iters, inflation=inflation)
    runs = [_run(filt, A, obs, ys, L, 200, s) for s in range(40)]
    means = torch.stack([r[0] for r in runs])
    se = means.std(0) / math.sqrt(40)
    assert bool(((means.mean(0) - kf.means).abs() <= 3.5 * se + 1e-12).all())
    ratio = torch.tensor([math.exp(r[1] - float(kf.log_z.sum())) for r in runs], dtype=F64)
    assert abs(float(ratio.mean()) - 1) <= 3 * float(ratio.std()) / math.sqrt(40)


def test_the_comparison_detects_a_wrong_model():
    """The same check fails when the filter's q is wrong (1.6 instead of 0.4)."""
    A, obs, L, _, ys, kf = _linear_case()
    runs = [_run(LookaheadPF(q=1.6), A, obs, ys, L, 200, s) for s in range(40)]
    means = torch.stack([r[0] for r in runs])
    se = means.std(0) / math.sqrt(40)
    assert not bool(((means.mean(0) - kf.means).abs() <= 3.5 * se + 1e-12).all())


def test_cubic_gauss_newton_proposal_concentrates_weights():
    """Nonlinear (cubic) observation, y = x^3 + N(0, 8) at |x| ~ 8 (likelihood ~0.01 wide in
    x): the bootstrap proposal collapses (ESS ~1 of 256), one linearisation at the prior
    mean helps, Gauss–Newton re-linearisation (Laplace proposal) keeps most particles."""
    A, *_ = _setup()
    obs = Observation(Cubic(), GaussianNoise(var=8.0))
    g = torch.Generator().manual_seed(5)
    x0 = torch.tensor([8.0, -7.0, 9.0], dtype=F64) + 0.3 * torch.randn(
        256, 3, generator=g, dtype=F64
    )
    truth = torch.tensor([[8.2, -6.9, 8.9]], dtype=F64) @ torch.linalg.matrix_power(A, 4).T
    y = obs.sample(truth, torch.Generator().manual_seed(6))[0]
    ess = {}
    for iters in (0, 1, 4):
        filt = LookaheadPF(q=0.3, iters=iters, ess_threshold=0.0)
        _, info = filt.window(PhysicalFlow(_LinearSim(A)), Ensemble(x0), y, obs, 4,
                              torch.Generator().manual_seed(7))  # fmt: skip
        ess[iters] = info["ess"]
    assert ess[0] < 5 < 2 * ess[0] * 5 < ess[1] < 0.5 * ess[4]
    assert ess[4] > 0.4 * 256


def test_bad_options_raise():
    for kw in ({"q": 0.0}, {"q": 0.1, "inject": "middle"}, {"q": 0.1, "iters": -1},
               {"q": 0.1, "inflation": 0.0}, {"q": 0.1, "scheme": "nope"},
               {"q": 0.1, "fd": "backward"}):  # fmt: skip
        with pytest.raises(InputError):
            LookaheadPF(**kw)
    with pytest.raises(InputError):
        PhysicalFlow(object())


def _l63_world():
    import models

    world = models.load("models/checkpoints/l63.pt", device="cpu")
    world.eval()
    return world


def test_diffusion_flow_mean_path_is_deterministic_and_close_to_the_sampled_step():
    """The noise-free path is a function of ``x`` (no random numbers) and lies within a few
    sampling spreads of the world's own stochastic step (spread ~0.007 per step)."""
    from assim.lookahead import DiffusionFlow
    from models.worlds.physical import physical_world

    world = _l63_world()
    flow = DiffusionFlow(world, steps=5)
    x = physical_world("l63").forecast(torch.tensor([1.0, 1.0, 20.0]), 300)[0, 100::20].float()
    with torch.no_grad():
        a, b = flow.mean_step(x), flow.mean_step(x)
        world.configure(q=0.0)
        draws = torch.stack([world.step(x, torch.Generator().manual_seed(s)) for s in range(16)])
    assert torch.equal(a, b)
    assert float((a - draws.mean(0)).abs().max()) < 5 * float(draws.std(0).max()) + 1e-3
    kern = flow.kernel(x, 0.2, torch.Generator().manual_seed(0))
    # stopped at q: the last kernel's variance is ~q^2 per point (pointwise normalisation
    # rescales q by s_i / rms(s) in [0.6, 1.4] for this world)
    ratio = kern.var / 0.04
    assert bool(((ratio > 0.2) & (ratio < 2.0)).all())


def test_learned_lookahead_filter_tracks_lorenz63():
    """Four windows of L63-std with the learned world: the analysis error stays well below
    the observation error std sqrt(2) (a broken flow, proposal or weight loses the truth)."""
    from assim.lookahead import DiffusionFlow
    from models.worlds.physical import physical_world

    phys = physical_world("l63")
    g = torch.Generator().manual_seed(11)
    x = phys.forecast(torch.tensor([1.0, 1.0, 20.0], dtype=F64), 500)[0, -1:]
    obs = Observation("identity", GaussianNoise(std=math.sqrt(2.0)))
    ens = Ensemble((x + torch.randn(64, 3, generator=g, dtype=F64)).float())
    flow, filt = DiffusionFlow(_l63_world(), steps=3), LookaheadPF(q=0.2, linearise="mean")
    errs = []
    for _ in range(4):
        for _ in range(25):
            x = phys.deterministic_step(x)
        y = obs.sample(x, g)[0].float()
        ens, info = filt.window(flow, ens, y, obs, 25, g)
        errs.append(float((ens.mean().double() - x[0]).pow(2).mean().sqrt()))
        assert math.isfinite(info["log_z"]) and info["ess"] > 5
    assert sum(errs) / 4 < 0.7


def _mixture_posterior_means(AL, QL, H, r_mat, ys, mix, scale2):
    """Exact posterior means of the linear window model with mixture model error
    ``(1 - mix) N(0, QL) + mix N(0, scale2 QL)``: a Gaussian mixture, one Kalman filter per
    sequence of components (2^K of them), weighted by its evidence."""
    from assim.filters.kalman import kalman_update

    comps = [(0.0, torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))]  # (log w, m, P)
    out = []
    for y in ys:
        new = []
        for lw, m, P in comps:
            for pc, sc in ((1 - mix, 1.0), (mix, scale2)):
                ma, Pa, lz = kalman_update(AL @ m, AL @ P @ AL.T + sc * QL, y, H, r_mat)
                new.append((lw + math.log(pc) + float(lz), ma, Pa))
        comps = new
        lws = torch.tensor([c[0] for c in comps], dtype=F64)
        w = torch.softmax(lws, 0)
        out.append(sum(wi * c[1] for wi, c in zip(w, comps, strict=True)))
    return torch.stack(out)


@pytest.mark.parametrize("linearise", ["particle", "mean"])
def test_mixture_model_error_matches_the_exact_mixture_posterior(linearise):
    """Heavy-tailed model error (mix 0.2, scale 3): posterior means within 3.5 MC s.e. of the
    exact Gaussian-mixture posterior (40 runs, as above) -- checks the mixture proposal
    density and the mixture prior density in the weights."""
    A, H, obs, AL, QL, L, q = _setup()
    g = torch.Generator().manual_seed(4)
    x, ys = torch.randn(3, generator=g, dtype=F64), []
    chol = torch.linalg.cholesky(QL)
    for k in range(3):
        x = AL @ x + (3.0 if k == 1 else 1.0) * chol @ torch.randn(3, generator=g, dtype=F64)
        ys.append(H @ x + 0.5 * torch.randn(2, generator=g, dtype=F64))
    ys = torch.stack(ys)
    exact = _mixture_posterior_means(AL, QL, H, 0.25 * torch.eye(2, dtype=F64), ys, 0.2, 9.0)
    filt = LookaheadPF(q=q, mix=0.2, mix_scale=3.0, linearise=linearise)
    means = torch.stack([_run(filt, A, obs, ys, L, 200, s)[0] for s in range(40)])
    se = means.std(0) / math.sqrt(40)
    assert bool(((means.mean(0) - exact).abs() <= 3.5 * se + 1e-12).all())
    # and the plain (non-mixture) Kalman filter is rejected by the same check
    r_mat, zero, eye = (
        0.25 * torch.eye(2, dtype=F64),
        torch.zeros(3, dtype=F64),
        torch.eye(3, dtype=F64),
    )
    kf = kalman_filter(AL, None, QL, H, r_mat, zero, eye, ys)
    assert not bool(((means.mean(0) - kf.means).abs() <= 3.5 * se + 1e-12).all())
