"""The diffusion particle filter against exact references (BENCHMARKS.md C).

World: :class:`DiffusionLinearGaussian`, a diffusion chain driven by the exact
conditional Gaussian oracle. Its one-step transition is exactly linear-Gaussian
(``effective()``), so the Kalman filter on ``(A_eff, b_eff, Q_eff)`` is the exact posterior.

Monte-Carlo standard errors come from ``R`` independent filter runs (different
generators): ``se = std_r(estimate) / sqrt(R)``; a posterior mean/variance passes when
``|mean_r(estimate) - exact| <= k se`` for every cycle and component, ``k`` = 3 for one
quantity and the Bonferroni-corrected Student-t quantile for many (``_within``); the
O(1/ESS) bias of self-normalised estimates is far below ``se`` in these settings.
``test_the_comparison_detects_a_wrong_filter`` shows the same check rejects a filter
that assimilates with a wrong noise level. The evidence test checks ``E[Z_hat / Z] = 1``:
``|mean_r(exp(logZ_hat - logZ)) - 1| <= 3 se`` -- unbiasedness in ``exp``.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import t as student_t

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf import DiffusionParticleFilter, make_dpf
from assim.filters.dpf_local import LocalDiffusionParticleFilter
from assim.filters.kalman import kalman_filter
from assim.obs import Arctan, GaussianNoise, Identity, Linear, Observation, Subset
from models.worlds.diffusion_lg import DiffusionLinearGaussian

F64 = torch.float64


def _model(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = 0.8 * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    b = 0.1 * torch.randn(d, generator=g, dtype=F64)
    L = 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    return A, b, L @ L.T + 0.3 * torch.eye(d, dtype=F64)


def _simulate(world, obs, d: int, K: int, seed: int) -> torch.Tensor:
    A, b, Q = world.effective()
    g = torch.Generator().manual_seed(seed)
    x, ys = torch.zeros(1, d, dtype=F64), []
    for _ in range(K):
        x = x @ A.T + b + torch.randn(1, d, generator=g, dtype=F64) @ torch.linalg.cholesky(Q).T
        ys.append(obs.sample(x, g)[0])
    return torch.stack(ys)


def _run(world, filt, obs, ys, x0_fn, R: int, N: int, seed0: int = 100):
    """``R`` independent runs: means, variances ``(R, K, d)``, total log-evidence ``(R,)``."""
    K, d = ys.shape[0], world.state_shape[0]
    means = torch.zeros(R, K, d, dtype=F64)
    var = torch.zeros(R, K, d, dtype=F64)
    log_z = torch.zeros(R, dtype=F64)
    for r in range(R):
        g = torch.Generator().manual_seed(seed0 + r)
        ens = Ensemble(x0_fn(N, g))
        for k in range(K):
            ens, info = filt.cycle(world, ens, ys[k], obs, g)
            means[r, k], var[r, k] = ens.mean(), ens.var()
            log_z[r] += info["log_z"]
    return means, var, log_z


def test_effective_transition_of_the_diffusion_world_is_exact():
    """The oracle behind every test here: ``effective()`` is the chain's transition.
    Residuals of 200k steps from random states: mean 0 within 4 s.e. (sqrt(Q_ii / n)),
    covariance within 4 s.e. of a sample covariance (sqrt((Q_ii Q_jj + Q_ij^2) / n))."""
    d = 3
    A, b, Q = _model(d, seed=5)
    world = DiffusionLinearGaussian(A, b, Q, steps=3, q=0.2)
    Ae, be, Qe = world.effective()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.randn(n, d, generator=g, dtype=F64)
    res = world.step(x, g) - (x @ Ae.T + be)
    assert bool((res.mean(0).abs() < 4 * (torch.diagonal(Qe) / n).sqrt()).all())
    se = ((torch.outer(Qe.diagonal(), Qe.diagonal()) + Qe**2) / n).sqrt()
    assert bool(((torch.cov(res.T) - Qe).abs() < 4 * se).all())
    # and the chain approaches N(A x + b, Q + q^2 I) as the steps grow
    fine = DiffusionLinearGaussian(A, b, Q, steps=200, q=0.2).effective()
    target = Q + 0.04 * torch.eye(d, dtype=F64)
    assert float((fine[2] - target).abs().max()) < 0.2 * float((Qe - target).abs().max())
    torch.testing.assert_close(fine[0], A, rtol=0, atol=1e-3)


def _within(est: torch.Tensor, exact: torch.Tensor, k: float | None = None) -> None:
    """Every entry of ``mean_r(est)`` within ``k`` s.e. of ``exact``. Default ``k``: 3 s.e.
    for a single entry; for ``n`` entries the Bonferroni bound of a Student-t with
    ``R - 1`` d.o.f. at family-wise level 1 % (a correct filter fails with prob. 1 %)."""
    reps, n = est.shape[0], est[0].numel()
    if k is None:
        k = 3.0 if n == 1 else max(3.0, float(student_t.ppf(1 - 0.005 / n, reps - 1)))
    se = est.std(0) / math.sqrt(reps)
    err = (est.mean(0) - exact).abs()
    assert bool((err <= k * se).all()), f"max |err|/se = {float((err / se).max()):.2f} > {k:.2f}"


@pytest.mark.parametrize(
    "d, operator, twist",
    [(2, Identity(), "gaussian"), (10, Subset(every=2), "gaussian"), (2, Identity(), "dps")],
)
def test_dpf_matches_kalman(d, operator, twist):
    assert_matches_kalman(DiffusionParticleFilter(twist=twist), d, operator, gap=True)


def linear_case(d: int, operator, std: float, gap: bool = False, K: int = 3):
    """The linear-Gaussian test case shared by the Kalman comparisons: the diffusion world
    of ``_model(d)`` (3 steps, q 0.2), ``K`` observations ``operator(x) + N(0, std^2)``
    (``gap``: cycle 1 partly unobserved), the exact Kalman filter from ``N(0, I)`` and a
    sampler of that initial ensemble. Returns ``(world, obs, ys, kf, x0)``."""
    A, b, Q = _model(d)
    world = DiffusionLinearGaussian(A, b, Q, steps=3, q=0.2)
    obs = Observation(operator, GaussianNoise(std=std))
    ys = _simulate(world, obs, d, K, seed=1)
    if gap:
        ys[1, 0] = math.nan  # a partially observed cycle (NaN = unobserved)
    H = operator.matrix((d,), dtype=F64)
    Ae, be, Qe = world.effective()
    m0, P0 = torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)
    R = std**2 * torch.eye(H.shape[0], dtype=F64)
    kf = kalman_filter(Ae, be, Qe, H, R, m0, P0, ys)

    def x0(n, g):
        return torch.randn(n, d, generator=g, dtype=F64)

    return world, obs, ys, kf, x0


def assert_matches_kalman(filt, d: int, operator, gap: bool = False) -> None:
    """``filt`` on the diffusion linear-Gaussian world, 3 cycles (``gap``: cycle 1 partly
    unobserved), 24 runs x 400 particles: posterior mean and variance within MC error of
    the Kalman filter at every cycle, the evidence unbiased in ``exp``."""
    # R = I keeps the ESS healthy, so the O(1/ESS) bias of self-normalised estimates
    # (~1-3 % of the variance with R = 0.25 I, for the bootstrap PF as well) << se.
    world, obs, ys, kf, x0 = linear_case(d, operator, std=1.0, gap=gap)
    means, var, log_z = _run(world, filt, obs, ys, x0, R=24, N=400)
    _within(means, kf.means)
    _within(var, torch.diagonal(kf.covs, dim1=1, dim2=2))
    _within(torch.exp(log_z - kf.log_z.sum()).unsqueeze(1), torch.ones(1, dtype=F64))


def test_the_comparison_detects_a_wrong_filter():
    world, _, ys, kf, x0 = linear_case(2, Identity(), std=1.0)
    wrong = Observation(Identity(), GaussianNoise(std=0.7))
    _, var, _ = _run(world, DiffusionParticleFilter(), wrong, ys, x0, R=24, N=400)
    with pytest.raises(AssertionError):
        _within(var, torch.diagonal(kf.covs, dim1=1, dim2=2))


def test_exact_twists_give_constant_weights():
    """With the chain's exact twists (diagonal model, identity H), the twisted Gaussian
    proposal is the locally optimal one: every incremental weight after the first is the
    same, so the final ESS equals the ESS of the initial twist weights."""
    d = 4
    world = DiffusionLinearGaussian(
        0.8 * torch.eye(d, dtype=F64), None, 0.5 * torch.eye(d), steps=4
    )
    obs = Observation(Identity(), GaussianNoise(std=0.3))
    y = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=F64)
    filt = DiffusionParticleFilter(inner_threshold=0.0)
    x, log_w, info = filt.propagate(
        world, Ensemble(torch.zeros(500, d, dtype=F64)), y, obs, torch.Generator().manual_seed(0)
    )
    assert info["ess"] == pytest.approx(info["min_inner_ess"], rel=1e-9)
    # the bootstrap filter through the same chain is far from that (the test can fail)
    boot = DiffusionParticleFilter(twist="none", inner_threshold=0.0)
    _, _, info_b = boot.propagate(
        world, Ensemble(torch.zeros(500, d, dtype=F64)), y, obs, torch.Generator().manual_seed(0)
    )
    assert info_b["ess"] < 0.5 * info["ess"]


def test_dpf_arctan_matches_large_bootstrap_reference():
    """Nonlinear operator (arctan), 2-D, one step from N(m0, P0): the reference posterior
    mean/variance and evidence come from 10^6 exact draws of the effective transition
    weighted by the likelihood (its own MC error is ~1e-3, below the dpf's se)."""
    d = 2
    A, b, Q = _model(d, seed=3)
    world = DiffusionLinearGaussian(A, b, Q, steps=3, q=0.1)
    obs = Observation(Arctan(), GaussianNoise(std=0.1))
    Ae, be, Qe = world.effective()
    m0 = torch.tensor([0.5, -0.5], dtype=F64)
    y = torch.tensor([0.7, -0.2], dtype=F64)
    g = torch.Generator().manual_seed(7)
    M = 1_000_000
    x0 = m0 + torch.randn(M, d, generator=g, dtype=F64)
    x1 = x0 @ Ae.T + be + torch.randn(M, d, generator=g, dtype=F64) @ torch.linalg.cholesky(Qe).T
    lw = obs.log_likelihood(y, x1)
    w = torch.softmax(lw, 0)
    ref_mean = w @ x1
    ref_var = w @ (x1 - ref_mean) ** 2
    ref_log_z = float(torch.logsumexp(lw, 0) - math.log(M))

    def init(n, gen):
        return m0 + torch.randn(n, d, generator=gen, dtype=F64)

    for twist in ("gaussian", "dps"):
        filt = DiffusionParticleFilter(twist=twist)
        means, var, log_z = _run(world, filt, obs, y[None], init, R=24, N=400)
        _within(means[:, 0], ref_mean)
        _within(var[:, 0], ref_var)
        _within(torch.exp(log_z - ref_log_z).unsqueeze(1), torch.ones(1, dtype=F64))


@pytest.mark.parametrize("twist", ["gaussian", "dps", "none"])
@pytest.mark.parametrize("operator", [Subset(every=2), Arctan()])
def test_local_with_infinite_radius_equals_global(twist, operator):
    d = 10
    Q = 0.5 * torch.eye(d, dtype=F64) + 0.1
    world = DiffusionLinearGaussian(0.9 * torch.eye(d, dtype=F64), None, Q, steps=4, q=0.1)
    obs = Observation(operator, GaussianNoise(std=0.2))
    g = torch.Generator().manual_seed(0)
    y = obs.sample(torch.randn(1, d, generator=g, dtype=F64), g)[0]
    x0 = torch.randn(200, d, generator=g, dtype=F64)
    glob = DiffusionParticleFilter(twist=twist, inner_threshold=0.9)
    loc = LocalDiffusionParticleFilter(radius=math.inf, twist=twist, inner_threshold=0.9)
    xa, la, ia = glob.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(5))
    xb, lb, ib = loc.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(5))
    assert ia["inner_resamples"] == ib["inner_resamples"]
    if twist != "none":
        assert ia["inner_resamples"] > 0  # the equivalence covers local resampling
    torch.testing.assert_close(xb, xa, rtol=0, atol=1e-10)
    torch.testing.assert_close(lb, la[:, None].expand_as(lb), rtol=0, atol=1e-9)
    assert ib["log_z"] == pytest.approx(ia["log_z"], abs=1e-9)


def test_local_filter_cycle_and_bad_input(device):
    d = 12
    world = DiffusionLinearGaussian(0.9 * torch.eye(d, dtype=F64), None,
                                    0.3 * torch.eye(d, dtype=F64), steps=2, q=0.1)  # fmt: skip
    obs = Observation(Subset(every=3), GaussianNoise(std=0.3))
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(32, d, generator=g, dtype=F64, device=device)
    y = torch.tensor([0.5, -0.2, 0.1, 1.0], dtype=F64, device=device)
    filt = make_dpf(world, radius=2.0)
    assert isinstance(filt, LocalDiffusionParticleFilter)
    world_dev = world.to(device)
    ens, info = filt.cycle(world_dev, Ensemble(x0), y, obs, g)
    assert ens.x.shape == (32, d) and ens.x.device == x0.device
    assert torch.allclose(ens.log_w, torch.full_like(ens.log_w, -math.log(32)))
    assert 1.0 <= info["ess"] <= 32 and math.isfinite(info["log_z"])
    full_r = Observation(Linear(torch.ones(2, d, dtype=F64)), GaussianNoise(std=0.3))
    with pytest.raises(InputError, match="localised dpf"):
        filt.cycle(world_dev, Ensemble(x0), y[:2], full_r, g)


def test_skipped_cycle_and_dps_only_is_labelled_biased():
    d = 3
    world = DiffusionLinearGaussian(torch.eye(d, dtype=F64), None, 0.1 * torch.eye(d), steps=2)
    obs = Observation(Identity(), GaussianNoise(std=0.3))
    x0 = torch.zeros(16, d, dtype=F64)
    nan = torch.full((d,), math.nan, dtype=F64)
    ens, info = DiffusionParticleFilter().cycle(world, Ensemble(x0), nan, obs,
                                                torch.Generator().manual_seed(1))  # fmt: skip
    assert info["skipped"] and info["log_z"] == 0.0
    ref = world.step(x0, torch.Generator().manual_seed(1))
    assert torch.equal(ens.x, ref)  # a skipped cycle is exactly the world's step
    y = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    _, info = DiffusionParticleFilter(twist="dps_only").cycle(world, Ensemble(x0), y, obs)
    assert info["biased"] and math.isnan(info["log_z"])


def test_twist_none_without_resampling_is_the_world_step():
    """Bootstrap through the chain: the particles are bitwise the world's own step."""
    d = 3
    world = DiffusionLinearGaussian(torch.eye(d, dtype=F64), None, 0.1 * torch.eye(d), steps=3)
    obs = Observation(Identity(), GaussianNoise(std=0.3))
    x0 = torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    filt = DiffusionParticleFilter(twist="none", inner_threshold=0.0)
    x, log_w, info = filt.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(4))
    assert torch.equal(x, world.step(x0, torch.Generator().manual_seed(4)))
    torch.testing.assert_close(log_w, torch.log_softmax(obs.log_likelihood(y, x), 0))


def test_bad_options_raise():
    with pytest.raises(InputError, match="twist"):
        DiffusionParticleFilter(twist="magic")
    with pytest.raises(InputError, match="ess_threshold"):
        DiffusionParticleFilter(ess_threshold=-1)
    with pytest.raises(InputError, match="radius"):
        LocalDiffusionParticleFilter(radius=0.0)
    with pytest.raises(InputError, match="configure"):
        make_dpf(object(), steps=3)
    obs = Observation(Identity(), GaussianNoise(std=1.0))
    with pytest.raises(InputError, match="diffusion world"):
        DiffusionParticleFilter().cycle(object(), Ensemble(torch.zeros(4, 2)), torch.zeros(2), obs)


def test_rolling_chain_survives_inner_resampling():
    """A Rolling chain carries hidden window state: after resampling inside the chain the
    filter must reindex it (a rebuilt chain has no window and raises)."""
    from models.worlds.rolling import Rolling, RollingSpec

    torch.manual_seed(0)
    spec = RollingSpec(
        state_shape=(6,),
        dt=0.1,
        window=3,
        init_steps=4,
        shift_steps=2,
        backbone_kwargs=dict(width=8, depth=1),
    )
    world = Rolling(spec).eval()
    g = torch.Generator().manual_seed(3)
    ens = Ensemble(torch.randn(16, 6, generator=g))
    obs = Observation(Identity(), GaussianNoise(1.0))
    y = torch.zeros(6)
    local = LocalDiffusionParticleFilter(radius=2.0, inner_threshold=1.0)
    for filt in (DiffusionParticleFilter(inner_threshold=1.0), local):  # resample every step
        out, info = filt.cycle(world, ens, y, obs, generator=g)
        assert info["inner_resamples"] > 0
        assert torch.isfinite(out.x).all() and math.isfinite(info["log_z"])


def test_dense_taper_equals_gathered_taper():
    """The dense ``(m, d)`` taper matrix (small grids) and the neighbour-list gather give the
    same local weights: directly, and through a whole local cycle with inner resampling."""
    from assim.filters.dpf_local import _Taper
    from assim.filters.letkf import local_taper

    d = 15
    op = Subset(every=2)
    i, r = local_taper((d,), op.coords((d,)), 2.0)
    m = op.coords((d,)).shape[0]
    dense, gather = (_Taper(i, r, "cpu", F64, m, flag) for flag in (True, False))
    assert dense.dense is not None and gather.dense is None
    terms = torch.randn(7, m, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(dense.apply(terms), gather.apply(terms), rtol=0, atol=1e-12)
    world = DiffusionLinearGaussian(0.9 * torch.eye(d, dtype=F64), None,
                                    0.3 * torch.eye(d, dtype=F64), steps=3, q=0.1)  # fmt: skip
    obs = Observation(op, GaussianNoise(std=0.2))
    g = torch.Generator().manual_seed(1)
    y = obs.sample(torch.randn(1, d, generator=g, dtype=F64), g)[0]
    x0 = torch.randn(64, d, generator=g, dtype=F64)
    out = []
    for flag in (True, False):
        filt = LocalDiffusionParticleFilter(radius=2.0, inner_threshold=0.9)
        filt.dense_taper = flag
        out.append(filt.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(2)))
    assert out[0][2]["inner_resamples"] == out[1][2]["inner_resamples"] > 0
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=1e-9)


def test_outputs_are_ordinary_tensors():
    """The filter runs under inference mode; what it returns must still be modifiable in
    place and usable with autograd by the caller."""
    d = 4
    world = DiffusionLinearGaussian(torch.eye(d, dtype=F64), None, 0.1 * torch.eye(d), steps=2)
    obs = Observation(Identity(), GaussianNoise(std=0.3))
    y = torch.zeros(d, dtype=F64)
    x0 = torch.randn(8, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    for filt in (DiffusionParticleFilter(), LocalDiffusionParticleFilter(radius=1.0)):
        ens, _ = filt.cycle(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(1))
        assert not ens.x.is_inference() and not ens.log_w.is_inference()
        ens.x.add_(1.0)
        ens.log_w.mul_(1.0)


@pytest.mark.parametrize("operator", [Identity(), Subset(every=2)])
def test_innovation_q2_recovers_the_model_error(operator):
    """Moment estimate of ``q^2``: truth and particles share the forecast law ``mu + s eps``,
    the truth adds ``N(0, q^2)``. ``E[q_hat^2] = q^2 + 2 s^2 / N`` (the innovation carries
    ``s^2 (1 + 1/N)``, the 1/N-weighted spread ``s^2 (1 - 1/N)``): 0.0008 here. Its se, from
    ``Var(d_o^2) = 2 (R + s^2 + q^2)^2`` over ``m`` >= 1000 observations, is <= 0.016, so
    the tolerance 0.05 is ~3 se; leaving out ``R`` would be off by 0.25."""
    from assim.filters.dpf import innovation_q2
    from assim.guidance import ObsSpace

    d, n, q, s, r = 2000, 50, 0.3, 0.2, 0.5
    g = torch.Generator().manual_seed(0)
    mu = 3 * torch.randn(d, generator=g, dtype=F64)
    x_hat = mu + s * torch.randn(n, d, generator=g, dtype=F64)
    noise = torch.randn(2, d, generator=g, dtype=F64)
    truth = mu + s * noise[0] + q * noise[1]
    obs = Observation(operator, GaussianNoise(std=r))
    y = obs.sample(truth[None], g)[0]
    space = ObsSpace(obs, (d,), F64, "cpu")
    log_w = torch.full((n,), -math.log(n), dtype=F64)
    assert innovation_q2(space, y, x_hat, log_w) == pytest.approx(q * q, abs=0.05)


def test_adapted_q_follows_the_innovations(monkeypatch):
    """``adapt_q = rho``: before cycle k+1 the world is configured with ``q^2 = (1 - rho)
    q_prev^2 + rho q_hat_k^2`` (clamped), ``q_hat_k`` from cycle k's innovations."""
    import assim.filters.dpf as dpf_mod

    class QWorld(DiffusionLinearGaussian):
        def configure(self, q=None, **kw):
            self.asked.append(q)
            return self

    d = 6
    world = QWorld(0.9 * torch.eye(d, dtype=F64), None, 0.2 * torch.eye(d, dtype=F64),
                   steps=2, q=0.3)  # fmt: skip
    world.asked = []
    seen = []
    real = dpf_mod.innovation_q2
    monkeypatch.setattr(dpf_mod, "innovation_q2", lambda *a: seen.append(real(*a)) or seen[-1])
    obs = Observation(Identity(), GaussianNoise(std=0.5))
    g = torch.Generator().manual_seed(0)
    ens = Ensemble(torch.randn(32, d, generator=g, dtype=F64))
    filt = LocalDiffusionParticleFilter(radius=2.0, adapt_q=0.5, q_range=(0.1, 0.8))
    for y0 in (3.0, 0.0, 0.0):  # a large first innovation, then small ones
        ens, info = filt.cycle(world, ens, torch.full((d,), y0, dtype=F64), obs, g)
    assert len(seen) == 3 and len(world.asked) == 2
    q2 = 0.3**2
    for est, asked in zip(seen[:2], world.asked, strict=True):
        q2 = min(max(0.5 * q2 + 0.5 * est, 0.1**2), 0.8**2)
        assert asked == pytest.approx(math.sqrt(q2), rel=1e-12)
    assert world.asked[0] > 0.3  # the large innovation raised q
    with pytest.raises(InputError, match="adapt_q"):
        DiffusionParticleFilter(adapt_q=0.5, twist="dps")
    with pytest.raises(InputError, match="q_range"):
        DiffusionParticleFilter(adapt_q=0.5, q_range=(0.0, 1.0))


def test_reusing_denoised_states_is_exact_for_an_elementwise_denoiser():
    """``reuse_denoised`` stitches the ancestors' denoised states and kernels instead of
    re-running the denoiser. With diagonal ``A`` and ``Q`` the oracle denoiser and kernels
    act elementwise, so stitching commutes with them and both paths agree to rounding at
    a finite radius; with a coupled ``Q`` they differ (the check is not vacuous)."""
    d = 12
    obs = Observation(Subset(every=2), GaussianNoise(std=0.2))
    g = torch.Generator().manual_seed(0)
    y = obs.sample(torch.randn(1, d, generator=g, dtype=F64), g)[0]
    x0 = torch.randn(48, d, generator=g, dtype=F64)
    A = torch.diag(torch.linspace(0.5, 0.9, d, dtype=F64))
    for Q, equal in ((torch.diag(torch.linspace(0.2, 0.6, d, dtype=F64)), True),
                     (0.3 * torch.eye(d, dtype=F64) + 0.1, False)):  # fmt: skip
        world = DiffusionLinearGaussian(A, None, Q, steps=3, q=0.1)
        out = []
        for reuse in (True, False):
            filt = LocalDiffusionParticleFilter(radius=2.0, inner_threshold=1.0,
                                                reuse_denoised=reuse)  # fmt: skip
            out.append(
                filt.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(3))
            )
        assert out[0][2]["inner_resamples"] == out[1][2]["inner_resamples"] >= 2
        same = torch.allclose(out[0][0], out[1][0], rtol=0, atol=1e-10) and torch.allclose(
            out[0][1], out[1][1], rtol=0, atol=1e-9
        )
        assert same is equal
    # infinite radius: local resampling is global, so reuse is exact and equals the global
    world = DiffusionLinearGaussian(A, None, 0.3 * torch.eye(d, dtype=F64) + 0.1, steps=3, q=0.1)
    glob = DiffusionParticleFilter(inner_threshold=0.95)
    loc = LocalDiffusionParticleFilter(radius=math.inf, inner_threshold=0.95, reuse_denoised=True)
    xa, la, ia = glob.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(5))
    xb, lb, ib = loc.propagate(world, Ensemble(x0), y, obs, torch.Generator().manual_seed(5))
    assert ia["inner_resamples"] == ib["inner_resamples"] > 0
    torch.testing.assert_close(xb, xa, rtol=0, atol=1e-10)
    torch.testing.assert_close(lb, la[:, None].expand_as(lb), rtol=0, atol=1e-9)
