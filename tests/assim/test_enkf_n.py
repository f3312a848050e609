"""Finite-size EnKF (EnKF-N): dual solution vs the primal cost, limits, rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.enkf import ETKF, innovations, make_filter, random_rotation
from assim.filters.enkf_n import (
    EnKFN,
    dual_cost,
    hyperprior,
    primal_cost,
    solve_dual,
    spectrum,
)
from assim.obs import GaussianNoise, Identity, Linear, Observation

F64 = torch.float64


def _problem(device, d, m, n, seed, y_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64)
    H = torch.randn(m, d, generator=g, dtype=F64)
    noise = GaussianNoise(var=torch.rand(m, generator=g, dtype=F64) + 0.3)
    y = y_scale * torch.randn(m, generator=g, dtype=F64)
    return x.to(device), Observation(Linear(H.to(device)), noise), y.to(device)


def _primal_grad(w, Yw, dw, eps, k):
    """Analytic gradient of the primal cost (so BFGS converges to ~1e-10)."""
    return -Yw @ (dw - Yw.T @ w) + k * w / (eps + w @ w)


def _primal_mode(Yw, dw, eps, k, seed):
    """Brute force: BFGS on the primal cost from 20 random starts (the cost is
    non-convex), keeping the lowest minimum."""
    rng = np.random.default_rng(seed)
    n = Yw.shape[0]
    best = None
    for _ in range(20):
        w0 = rng.normal(size=n) * rng.choice([0.01, 0.3, 1.0, 3.0])
        res = scipy.optimize.minimize(
            primal_cost,
            w0,
            args=(Yw, dw, eps, k),
            jac=_primal_grad,
            method="BFGS",
            options={"gtol": 1e-12},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun


@pytest.mark.parametrize("mode_correction", [True, False])
@pytest.mark.parametrize(
    "dims", [(5, 3, 8), (6, 12, 7), (3, 3, 10)], ids=["obs-space", "ens-space", "l63-like"]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_dual_minimiser_is_the_primal_mode(device, dims, mode_correction, seed):
    # The EnKF-N analysis mean is mean + A^T w_a with w_a the global minimiser of the
    # primal cost J(w) (Bocquet et al. 2015); the dual's zeta_a = K / (eps + |w_a|^2).
    # Both are compared with a brute-force multi-start BFGS on J: agreement to 1e-6
    # (BFGS gtol 1e-11 on a cost whose Hessian is O(1..100) pins w to ~1e-9).
    d, m, n = dims
    x, obs, y = _problem(device, d, m, n, seed)
    filt = EnKFN(mode_correction=mode_correction)
    ens = Ensemble(x)
    inn = innovations(ens, y, obs)
    Yw, dw = inn.Yw.cpu().numpy(), inn.dw.cpu().numpy()
    s2, _, _, _, _ = spectrum(inn.Yw, inn.dw)
    eps, k = hyperprior(s2.cpu().numpy(), n, 1.0, 0, mode_correction)
    w_p, j_p = _primal_mode(Yw, dw, eps, k, seed)
    zeta = filt.zeta(inn.Yw, inn.dw)
    assert zeta == pytest.approx(k / (eps + w_p @ w_p), rel=1e-6)
    out, info = filt.analysis(ens, y, obs)
    mean_p = inn.mu.cpu().numpy() + inn.A.cpu().numpy().T @ w_p
    np.testing.assert_allclose(out.x.mean(0).cpu().numpy(), mean_p, rtol=1e-6, atol=1e-7)
    assert info["inflation"] == pytest.approx(math.sqrt((n - 1) / zeta))
    # the primal cost at the filter's weights is the brute-force minimum
    w_f = np.linalg.solve(Yw @ Yw.T + zeta * np.eye(n), Yw @ dw)
    assert primal_cost(w_f, Yw, dw, eps, k) <= j_p + 1e-9


def test_dual_solver_finds_the_global_minimum_on_a_dense_grid():
    # A two-minimum dual (one huge innovation along a weak direction, one along a strong
    # one): the returned zeta must beat every point of a 20000-point log grid.
    rng = np.random.default_rng(3)
    for _ in range(50):
        r = int(rng.integers(1, 6))
        s2 = 10 ** rng.uniform(-2, 4, r)
        du2 = 10 ** rng.uniform(-1, 3, r)
        eps, k = 1.1, float(rng.uniform(2, 40))
        z = solve_dual(s2, du2, eps, k)
        grid = np.geomspace(1e-6, 1e3 * k, 20000)
        assert dual_cost(z, s2, du2, eps, k) <= dual_cost(grid, s2, du2, eps, k).min() + 1e-10


def test_large_n_linear_gaussian_approaches_the_etkf(device):
    # With the data consistent with the prior, the EnKF-N's inflation l^2 = (N-1)/zeta_a
    # tends to 1 as N grows (eps_N -> 1, K/eps_N ~ N - 1 + O(1), and the data term is
    # O(m) against O(N)), so its analysis tends to the ETKF's = Kalman of the sample
    # moments. Deterministic: one fixed ensemble per N with exact prior moments N(0, I)
    # (whitened draws), y = 0 + 1 (a unit innovation); |l^2 - 1| must be < 3 m / N.
    d = m = 3
    obs = Observation(Identity(), GaussianNoise(var=1.0))
    y = torch.ones(m, dtype=F64, device=device)
    errs = []
    for n in (50, 500, 5000):
        g = torch.Generator().manual_seed(n)
        z = torch.randn(n, d, generator=g, dtype=F64)
        z = z - z.mean(0)
        L = torch.linalg.cholesky(z.T @ z / (n - 1))
        x = torch.linalg.solve_triangular(L, z.T, upper=False).T.to(device)
        filt = EnKFN(mode_correction=False)
        out, info = filt.analysis(Ensemble(x), y, obs)
        ref, _ = ETKF().analysis(Ensemble(x), y, obs)
        assert abs(info["inflation"] ** 2 - 1) < 3 * m / n
        errs.append(float((out.x.mean(0) - ref.x.mean(0)).abs().max()))
        # the Kalman mean of N(0, I), R = I, y = 1 is 0.5
        assert torch.allclose(ref.x.mean(0), torch.full((d,), 0.5, dtype=F64, device=device))
    assert errs[2] < errs[0] / 20 and errs[2] < 2e-3


def test_enkf_n_inflates_when_the_innovation_is_large(device):
    # zeta_a decreases (inflation grows) monotonically with the innovation's size: the
    # data term of the dual pulls zeta down; a filter with a sign error would deflate.
    x, obs, _ = _problem(device, 3, 3, 10, 0)
    filt = EnKFN()
    infl = []
    for scale in (0.0, 3.0, 30.0):
        y = obs.h(x).mean(0) + scale * torch.ones(3, dtype=F64, device=device)
        infl.append(filt.analysis(Ensemble(x), y, obs)[1]["inflation"])
    assert infl[0] < infl[1] < infl[2] and infl[2] > 2.0


def test_random_rotation_preserves_mean_and_covariance(device, gen):
    n = 9
    Q = random_rotation(n, gen(1), device)
    eye = torch.eye(n, dtype=F64, device=device)
    assert torch.allclose(Q @ Q.T, eye, atol=1e-12)
    assert torch.allclose(Q.sum(0), torch.ones(n, dtype=F64, device=device), atol=1e-12)
    assert not torch.allclose(Q, eye, atol=1e-2)
    x, obs, y = _problem(device, 4, 3, n, 2)
    a, _ = ETKF(inflation=1.1).analysis(Ensemble(x), y, obs)
    b, _ = ETKF(inflation=1.1, rotate=True).analysis(Ensemble(x), y, obs, generator=gen(5))
    assert torch.allclose(a.x.mean(0), b.x.mean(0), atol=1e-10)
    assert torch.allclose(torch.cov(a.x.T), torch.cov(b.x.T), atol=1e-10)
    assert not torch.allclose(a.x, b.x, atol=1e-3)


def test_make_filter_and_bad_options():
    f = make_filter("enkf-n", rotate=True, x_n=2.0, inflation=None)
    assert isinstance(f, EnKFN) and f.rotate and f.x_n == 2.0
    assert make_filter("etkf", rotate=True).rotate
    with pytest.raises(InputError, match="x_n"):
        EnKFN(x_n=0.0)
    with pytest.raises(InputError, match="does not take"):
        make_filter("enkf-n", radius=3.0)
    with pytest.raises(InputError, match="does not take"):
        make_filter("letkf", rotate=True)


def test_all_nan_observation_is_skipped():
    x, obs, y = _problem("cpu", 3, 3, 6, 0)
    out, info = EnKFN().analysis(Ensemble(x), torch.full_like(y, math.nan), obs)
    assert info["skipped"] and torch.equal(out.x, x)


@pytest.mark.parametrize("dims", [(4, 3, 8), (6, 12, 7)], ids=["obs-space", "ens-space"])
def test_update_is_the_etkf_of_the_inflated_prior(device, dims):
    # Given zeta_a, the EnKF-N analysis (members and Gaussian log-evidence) is the ETKF
    # analysis of the ensemble with anomalies scaled by l = sqrt((N-1)/zeta_a): checks
    # the re-use of the eigendecomposition against the independent ETKF code path.
    d, m, n = dims
    x, obs, y = _problem(device, d, m, n, 4)
    out, info = EnKFN().analysis(Ensemble(x), y, obs)
    mu = x.mean(0)
    ref, rinfo = ETKF().analysis(Ensemble(mu + info["inflation"] * (x - mu)), y, obs)
    assert torch.allclose(out.x, ref.x, atol=1e-10)
    assert info["log_z"] == pytest.approx(rinfo["log_z"], abs=1e-9)
    assert info["inflation"] == pytest.approx(math.sqrt((n - 1) / info["zeta"]))


def test_cli_assimilate_enkf_n_tracks_the_truth(tmp_path, capsys):
    # End to end through ``assim assimilate --method enkf-n`` (no inflation given: the
    # EnKF-N estimates it) on a small L96; it must track the truth far below the
    # climatological error (~3.6 for L96, ~5 for 12 variables at this forcing).
    import xarray as xr

    from assim.cli import main

    truth, obs, out = tmp_path / "t.nc", tmp_path / "o.nc", tmp_path / "a.nc"
    args = ["simulate", "l96", "--steps", "121", "--seed", "1", "--param", "n=12"]
    assert main([*args, "--out", str(truth)]) == 0
    args = ["observe", str(truth), "--operator", "every:2", "--sigma", "0.5", "--every", "2"]
    assert main([*args, "--seed", "3", "--out", str(obs)]) == 0
    args = ["assimilate", "--obs", str(obs), "--world", "physical:l96", "--method", "enkf-n"]
    args += ["--members", "12", "--truth", str(truth), "--init", "truth", "--init-std", "0.3"]
    assert main([*args, "--no-progress", "--seed", "4", "--out", str(out)]) == 0
    with xr.open_dataset(out) as a:
        rmse = a["rmse"].values
    assert rmse[10:].mean() < 1.0
    capsys.readouterr()
