"""Finite-size ensemble Kalman filter (EnKF-N), dual form.

Bocquet (2011), "Ensemble Kalman filtering without the intrinsic need for inflation",
NPG 18; Bocquet, Raanes & Hannart (2015), "Expanding the validity of the ensemble
Kalman filter without the intrinsic need for inflation", NPG 22 (eqs. 16-19, 36).

The EnKF-N treats the forecast ensemble's mean and covariance as uncertain and
integrates them out under a Jeffreys hyperprior. In the ensemble weights ``w`` ``(N,)``
(state ``x = mean + A^T w``, ``A`` ``(N, d)`` the anomalies) the analysis is the mode of
the *primal* cost

    ``J(w) = 1/2 |dw - Yw^T w|^2 + K/2 log(eps_N + |w|^2)``,

with ``Yw`` ``(N, m)`` / ``dw`` ``(m,)`` the whitened anomalies / innovation of
:mod:`assim.filters.enkf`, ``eps_N = 1 + 1/N`` and ``K = N + g`` (``g`` the nullity
correction, 0 as DAPPER's default). Writing ``log u = min_z [z u / K - log(z / K)
- 1]`` turns it into a scalar *dual* problem in ``zeta``:

    ``D(zeta) = 1/2 dw^T (I + Yw^T Yw / zeta)^{-1} dw + eps_N zeta / 2 - K/2 log zeta``

(up to a constant). With ``Yw Yw^T = V diag(s2) V^T`` and ``du`` the innovation in the
matching left singular directions, the first term is ``1/2 sum du_i^2 zeta /
(zeta + s2_i)``. Every stationary point of ``D`` lies in ``[K / (eps_N + sum du_i^2 /
s2_i), K / eps_N]``; we locate all sign changes of ``D'`` on a log grid of that
interval, refine each with Brent's method and keep the global minimiser ``zeta_a``.
The analysis is then the ETKF (symmetric square root) of the prior inflated by
``l^2 = (N - 1) / zeta_a``: anomalies ``l A`` and ``l Yw``. Its mean weights are
``(Yw Yw^T + zeta_a I)^{-1} Yw dw``, which is exactly the primal mode ``w_a`` (and
``zeta_a = K / (eps_N + |w_a|^2)``); the transform uses the approximate Hessian,
as DAPPER's ``EnKF_N(Hess=False)``.

Like DAPPER 1.7.1 (``hyperprior_coeffs``), the hyperprior can be *mode corrected*
(Bocquet et al. 2015, eq. 36, as DAPPER implements it): with ``c = (eps_N / c_L)^{
I_KH / 2}``, ``c_L = K / (N - 1)`` and ``I_KH = mean_i (N - 1) / (s2_i + N - 1)`` over
the ``N`` eigenvalues (zero-padded), ``eps_N <- eps_N / c`` and ``c_L <- c_L c``; and
``x_n`` multiplies both (``x_n = 1``: the fully agnostic hyperprior). Then ``K =
(N - 1) c_L``. ``mode_correction=False`` gives the plain Bocquet (2011) prior.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.enkf import EnsembleKalmanFilter, Innovations, gaussian_log_z

__all__ = ["EnKFN", "dual_cost", "hyperprior", "primal_cost", "solve_dual", "spectrum"]

_GRID = 64  # log-grid points used to bracket the dual's stationary points


def hyperprior(s2: np.ndarray, n: int, x_n: float = 1.0, g: int = 0, mode_correction: bool = True):
    """``(eps_N, K)`` of the EnKF-N hyperprior for ensemble size ``n``.

    ``s2`` ``(r,)``: eigenvalues of ``Yw Yw^T`` (``r <= n``; missing ones count as 0).
    See the module docstring for the mode correction and ``x_n``."""
    n1 = n - 1
    eps = (n + 1) / n
    c_l = (n + g) / n1
    if mode_correction:
        pad = np.zeros(n)
        pad[: len(s2)] = np.clip(s2, 0.0, None)
        i_kh = float(np.mean(n1 / (pad + n1)))
        c = math.sqrt((eps / c_l) ** i_kh)
        eps, c_l = eps / c, c_l * c
    eps, c_l = eps * x_n, c_l * x_n
    return eps, n1 * c_l


def dual_cost(zeta, s2: np.ndarray, du2: np.ndarray, eps: float, k: float):
    """``D(zeta)`` (module docstring) without its constant; ``zeta`` scalar or array."""
    z = np.asarray(zeta, dtype=float)[..., None]
    data = (du2 * z / (z + s2)).sum(-1)
    return 0.5 * data + 0.5 * eps * z[..., 0] - 0.5 * k * np.log(z[..., 0])


def _scaled_grad(zeta, s2: np.ndarray, du2: np.ndarray, eps: float, k: float):
    """``2 zeta D'(zeta) = zeta sum du2 s2 / (zeta + s2)^2 + eps zeta - K``: same sign as
    ``D'``, negative at 0+, increasing to +inf."""
    z = np.asarray(zeta, dtype=float)[..., None]
    return (z * du2 * s2 / (z + s2) ** 2).sum(-1) + eps * z[..., 0] - k


def solve_dual(s2: np.ndarray, du2: np.ndarray, eps: float, k: float) -> float:
    """Global minimiser ``zeta_a > 0`` of :func:`dual_cost`.

    ``s2`` ``(r,)`` positive eigenvalues, ``du2`` ``(r,)`` squared innovation components
    in the same directions (directions with ``s2 = 0`` only add a constant)."""
    hi = k / eps
    pos = s2 > 0
    lo = k / (eps + float((du2[pos] / s2[pos]).sum()))
    if not lo < hi * (1.0 - 1e-12):
        return hi
    grid = np.geomspace(lo, hi, _GRID)
    f = _scaled_grad(grid, s2, du2, eps, k)
    f[0], f[-1] = min(f[0], 0.0), max(f[-1], 0.0)  # the bounds bracket every root
    ups = np.flatnonzero((f[:-1] <= 0) & (f[1:] > 0))  # D' from - to +: local minima
    best, best_cost = hi, math.inf
    for j in ups:
        a, b = grid[j], grid[j + 1]
        if f[j] == 0:
            z = a
        else:
            z = brentq(_scaled_grad, a, b, args=(s2, du2, eps, k), xtol=1e-14 * b, rtol=1e-13)
        c = float(dual_cost(z, s2, du2, eps, k))
        if c < best_cost:
            best, best_cost = float(z), c
    return best


def spectrum(Yw: Tensor, dw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """Spectrum of the whitened anomalies ``Yw`` ``(N, m)`` from the smaller of
    ``Yw Yw^T`` / ``Yw^T Yw`` (``r = min(N, m)`` eigenpairs).

    Returns ``(s2, du2, basis, coef, obs_space)``: ``s2`` ``(r,)`` the squared singular
    values (null ones, ``<= 1e-12 max``, set to 0), ``du2`` ``(r,)`` the squared components
    of ``dw`` along the matching right singular vectors (0 on null directions, which only
    add a constant to the dual). ``Yw Yw^T = V diag(s2) V^T``; in ensemble space
    (``m >= N``) ``basis = V`` and ``coef = V^T Yw dw`` (``= s du``), in observation
    space ``basis = Yw U = V diag(s)`` ``(N, m)`` and ``coef = U^T dw`` (``= du``)."""
    n, m = Yw.shape
    obs_space = m < n
    if obs_space:
        lam, U = torch.linalg.eigh(Yw.T @ Yw)
        basis, coef = Yw @ U, U.T @ dw
    else:
        lam, basis = torch.linalg.eigh(Yw @ Yw.T)
        coef = basis.T @ (Yw @ dw)
    s2 = lam.clamp_min(0.0)
    s2 = torch.where(s2 > 1e-12 * s2.max().clamp_min(1e-300), s2, torch.zeros_like(s2))
    c2 = coef * coef if obs_space else coef * coef / s2.clamp_min(1e-300)
    du2 = torch.where(s2 > 0, c2, torch.zeros_like(s2))
    return s2, du2, basis, coef, obs_space


def primal_cost(w: np.ndarray, Yw: np.ndarray, dw: np.ndarray, eps: float, k: float) -> float:
    """``J(w)`` of the module docstring (NumPy, for checks)."""
    r = dw - Yw.T @ w
    return 0.5 * float(r @ r) + 0.5 * k * math.log(eps + float(w @ w))


class EnKFN(EnsembleKalmanFilter):
    """Finite-size EnKF (dual form, module docstring), = DAPPER ``EnKF_N(N, xN, g)``
    (``dual=True``, ``Hess=False``). ``inflation`` (1: none needed), ``rtps`` and
    ``rotate`` post-process as in :class:`~assim.filters.enkf.ETKF`. ``info["inflation"]``
    is the estimated prior anomaly inflation ``l = sqrt((N-1)/zeta_a)`` times
    ``inflation``; ``info["zeta"]`` is ``zeta_a``."""

    name = "enkf-n"

    def __init__(
        self,
        inflation: float = 1.0,
        rtps: float = 0.0,
        rotate: bool = False,
        x_n: float = 1.0,
        g: int = 0,
        mode_correction: bool = True,
    ) -> None:
        super().__init__(inflation=inflation, rtps=rtps, rotate=rotate)
        if not (math.isfinite(x_n) and x_n > 0):
            raise InputError(f"EnKF-N: x_n must be a finite number > 0, got {x_n!r}")
        if int(g) != g or g < 0:
            raise InputError(f"EnKF-N: g must be an integer >= 0, got {g!r}")
        self.x_n, self.g, self.mode_correction = float(x_n), int(g), bool(mode_correction)
        self._last: tuple[float, float] = (math.nan, math.nan)

    def _solve(self, s2: Tensor, du2: Tensor, n: int) -> float:
        s2n, du2n = s2.cpu().numpy(), du2.cpu().numpy()
        eps, k = hyperprior(s2n, n, self.x_n, self.g, self.mode_correction)
        return solve_dual(s2n, du2n, eps, k)

    def zeta(self, Yw: Tensor, dw: Tensor) -> float:
        """``zeta_a`` for whitened anomalies ``Yw`` ``(N, m)`` and innovation ``dw``."""
        s2, du2, _, _, _ = spectrum(Yw, dw)
        return self._solve(s2, du2, Yw.shape[0])

    def _update(self, inn: Innovations, generator: torch.Generator | None) -> tuple[Tensor, float]:
        # ETKF (see enkf.transform) of the prior inflated by l, i.e. of l Yw and l A,
        # re-using the eigenpairs: (l Yw)(l Yw)^T = V diag(l^2 s2) V^T, dd = l^2 s2 + N - 1,
        # w = V diag(l s du / dd) (V^T or U^T), T = V diag(sqrt((N-1)/dd)) V^T
        n = inn.Yw.shape[0]
        a = float(n - 1)
        s2, du2, basis, coef, obs_space = spectrum(inn.Yw, inn.dw)
        z = self._solve(s2, du2, n)
        infl = math.sqrt(a / z)
        self._last = (z, infl)
        dd = infl * infl * s2 + a
        w = basis @ (infl * coef / dd)
        if obs_space:  # T = I + B diag((sqrt(a/dd) - 1)/s2) B^T (identity off the range)
            gain = torch.where(s2 > 0, (torch.sqrt(a / dd) - 1) / s2.clamp_min(1e-300), 0.0)
            eye = torch.eye(n, dtype=basis.dtype, device=basis.device)
            T = eye + (basis * gain.unsqueeze(-2)) @ basis.T
        else:
            T = (basis * torch.sqrt(a / dd).unsqueeze(-2)) @ basis.T
        xa = inn.mu + (w.unsqueeze(-1) + T).T @ (infl * inn.A)
        quad = inn.dw @ inn.dw - infl * infl * (s2 * du2 / dd).sum()
        logdet = torch.log1p(infl * infl * s2 / a).sum()
        return xa, gaussian_log_z(inn, quad, logdet)

    def analysis(
        self,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """As :meth:`EnsembleKalmanFilter.analysis`, with ``info["zeta"]`` and the
        estimated inflation."""
        self._last = (math.nan, 1.0)
        out, info = super().analysis(ensemble, y, obs, generator)
        if not info["skipped"]:
            info["zeta"] = self._last[0]
            info["inflation"] = self._last[1] * self.inflation
        return out, info

    def __repr__(self) -> str:
        return (
            f"EnKFN(x_n={self.x_n}, g={self.g}, mode_correction={self.mode_correction}, "
            f"inflation={self.inflation}, rtps={self.rtps}, rotate={self.rotate})"
        )
