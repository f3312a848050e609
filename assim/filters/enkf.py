"""Ensemble Kalman filters: stochastic EnKF and ETKF (EnKF-sqrt); LETKF in :mod:`.letkf`.

Shapes: the ensemble is ``x`` ``(N, *S)`` (members first), ``d = prod(S)``; the
observation ``y`` is ``(m,)`` with NaN for "not observed" (those entries are dropped
with :meth:`Observation.subset`). Everything is done in float64 in *ensemble space*
(an ``N x N`` eigendecomposition), so the cost is ``O(N^2 (d + m) + N^3)`` per cycle and
nothing loops over members.

Notation (Hunt, Kostelich & Szunyogh 2007, "Efficient data assimilation for
spatiotemporal chaos: a local ensemble transform Kalman filter", Physica D 230):
``A`` ``(N, d)`` forecast anomalies, ``Y`` ``(N, m)`` anomalies of ``h(x_i)`` (the
ensemble of ``h``, so nonlinear operators need no Jacobian, as in DAPPER), and the
*whitened* quantities ``Yw = Y R^{-1/2}``, ``dw = (y - mean h(x)) R^{-1/2}`` (``R^{1/2}``
the Cholesky factor, or the standard deviations for a diagonal ``R``). With
``Yw Yw^T = V diag(s^2) V^T`` and ``D = diag(s^2 + N - 1)``:

* ETKF (symmetric square root, DAPPER's ``EnKF('Sqrt')``):
  ``Pw = V D^{-1} V^T``, ``w = Pw Yw dw``, ``T = V (N-1)^{1/2} D^{-1/2} V^T``,
  ``x_a = mean + (w 1^T + T)^T A``. With ``N > d`` and a linear ``h`` its mean and
  covariance are exactly the Kalman analysis of the ensemble's sample moments.
* Stochastic EnKF (perturbed observations, Burgers, van Leeuwen & Evensen 1998):
  ``x_a,i = x_i + A^T (Yw Yw^T + (N-1) I)^{-1} Yw (dw - Yw_i + z_i)``, with
  ``z_i ~ N(0, I)`` centred over members and rescaled by ``sqrt(N/(N-1))``, exactly as
  DAPPER's ``EnKF('PertObs')`` (its ``mean0(rescale=True)``).

After the update, relaxation to prior spread (RTPS, Whitaker & Hamill 2012,
``sigma_a <- sigma_a + alpha (sigma_b - sigma_a)`` per variable) and then
multiplicative inflation of the analysis anomalies (``A_a <- lambda A_a``, as DAPPER's
``post_process``) are applied; ``rotate=True`` then multiplies the analysis anomalies
by a random mean-preserving orthogonal ``N x N`` matrix (DAPPER's ``rot=True``: a
Haar-distributed rotation of the ``N - 1`` dimensional complement of ``1``), which
leaves the ensemble mean and covariance unchanged but mixes the members.

``info["log_z"]`` is the *Gaussian approximation* of the evidence increment,
``log N(y; mean h(x), Y^T Y / (N-1) + R)`` (``info["log_z_approx"] = True``), computed
with the matrix determinant lemma in ensemble space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble, Filter
from assim.rng import randn

__all__ = ["EnKF", "ETKF", "EnsembleKalmanFilter", "make_filter", "random_rotation"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class Innovations:
    """Ensemble quantities of one analysis, float64. ``mu`` ``(d,)``, ``A`` ``(N, d)``,
    ``Yw`` ``(N, m)``, ``dw`` ``(m,)``, ``logdet_r`` scalar, ``obs`` the (NaN-free)
    observation actually used,
    ``state_shape`` ``S``."""

    mu: Tensor
    A: Tensor
    Yw: Tensor
    dw: Tensor
    logdet_r: Tensor
    obs: Any
    state_shape: tuple[int, ...]


def _noise_whitener(noise: Any, m: int, device: torch.device) -> tuple[Tensor, bool, Tensor]:
    """``(W, diagonal, logdet R)`` with ``W`` the inverse standard deviations ``(m,)``
    (diagonal ``R``) or the lower Cholesky factor ``L`` ``(m, m)`` of ``R``."""
    f64 = torch.float64
    chol = getattr(noise, "chol", None)
    if chol is not None:  # a GaussianNoise with a full R, already factorised
        L = chol.to(device=device, dtype=f64)
        if L.shape != (m, m):
            raise InputError(f"observation noise R is {tuple(L.shape)} but there are {m} obs")
        return L, False, 2.0 * torch.log(torch.diagonal(L)).sum()
    if getattr(noise, "diagonal", False) is True and hasattr(noise, "var"):
        var = torch.as_tensor(noise.var, dtype=f64, device=device).expand(m)
    else:
        R = noise.covariance(m).to(device=device, dtype=f64)
        if R.shape != (m, m):
            raise InputError(f"observation noise covariance is {tuple(R.shape)}, expected {m}x{m}")
        off = R - torch.diag(torch.diagonal(R))
        if bool((off != 0).any()):
            L, info = torch.linalg.cholesky_ex(R)
            if int(info) != 0:
                raise InputError("observation noise covariance R is not positive definite")
            return L, False, 2.0 * torch.log(torch.diagonal(L)).sum()
        var = torch.diagonal(R)
    if not bool((var > 0).all()):
        raise InputError("observation noise variances must be > 0")
    return var.rsqrt(), True, torch.log(var).sum()


def _whiten(v: Tensor, W: Tensor, diagonal: bool) -> Tensor:
    """``v R^{-1/2}`` for rows ``v`` ``(..., m)``."""
    if diagonal:
        return v * W
    flat = v.reshape(-1, v.shape[-1]).T
    return torch.linalg.solve_triangular(W, flat, upper=False).T.reshape(v.shape)


def innovations(ensemble: Ensemble, y: Tensor, obs: Any) -> Innovations | None:
    """Centre the ensemble and whiten the observed innovations; ``None`` when no entry
    of ``y`` is observed. Raises :class:`InputError` on mis-shaped input."""
    x = ensemble.x
    if x.dim() < 2 or x.shape[0] < 2:
        raise InputError(f"ensemble must be (N, *S) with N >= 2, got shape {tuple(x.shape)}")
    lw = ensemble.log_w
    n = x.shape[0]
    if float(lw.max() - lw.min()) > 1e-6:
        raise InputError("ensemble Kalman filters need an equally weighted ensemble")
    y = torch.as_tensor(y).to(device=x.device, dtype=torch.float64).reshape(-1)
    x64 = x.to(torch.float64)
    hx = obs.h(x64)
    if hx.dim() != 2 or hx.shape[1] != y.shape[0]:
        raise InputError(
            f"observation y has {y.shape[0]} entries but the operator gives "
            f"{tuple(hx.shape[1:])} for state shape {tuple(x.shape[1:])}"
        )
    seen = ~torch.isnan(y)
    if not bool(seen.any()):
        return None
    if not bool(seen.all()):
        obs = obs.subset(seen)
        y, hx = y[seen], hx[:, seen]
    m = y.shape[0]
    W, diagonal, logdet_r = _noise_whitener(obs.noise, m, x.device)
    x64 = x64.reshape(n, -1)
    mu = x64.mean(0)
    ho = hx.mean(0)
    Yw = _whiten(hx - ho, W, diagonal)
    dw = _whiten(y - ho, W, diagonal)
    return Innovations(mu, x64 - mu, Yw, dw, logdet_r, obs, tuple(x.shape[1:]))


def transform(Yw: Tensor, dw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Symmetric ETKF transform, batched over leading dims.

    ``Yw`` ``(..., N, m)``, ``dw`` ``(..., m)`` -> ``w`` ``(..., N)``, ``T`` ``(..., N, N)``
    and, for the evidence, ``quad = dw^T (I + Yw^T Yw/(N-1))^{-1} dw`` and
    ``logdet = log det(I + Yw^T Yw/(N-1))`` ``(...)``. With ``a = N - 1``:

    * ``m >= N`` (ensemble space): ``Yw Yw^T = V diag(s2) V^T``,
      ``w = V diag(1/(s2+a)) V^T Yw dw``, ``T = V diag(sqrt(a/(s2+a))) V^T``;
    * ``m < N`` (observation space, cheaper): ``Yw^T Yw = U diag(l) U^T``, ``B = Yw U``,
      ``w = B diag(1/(l+a)) U^T dw`` and ``T = I + B diag(g(l)) B^T`` with
      ``g(l) = (sqrt(a/(l+a)) - 1)/l = -1/(sqrt(l+a)(sqrt(a)+sqrt(l+a)))``
      (same matrices: the eigenvectors of ``Yw Yw^T`` with non-zero eigenvalues are the
      columns of ``B diag(l^{-1/2})``, and ``T`` is the identity on the rest)."""
    n, m = Yw.shape[-2:]
    a = float(n - 1)
    if m < n:
        lam, U = torch.linalg.eigh(Yw.transpose(-1, -2) @ Yw)
        lam = lam.clamp_min(0.0)
        B = Yw @ U
        c = (U.transpose(-1, -2) @ dw.unsqueeze(-1)).squeeze(-1)
        w = (B @ (c / (lam + a)).unsqueeze(-1)).squeeze(-1)
        r = torch.sqrt(lam + a)
        g = -1.0 / (r * (math.sqrt(a) + r))
        eye = torch.eye(n, dtype=Yw.dtype, device=Yw.device)
        T = eye + (B * g.unsqueeze(-2)) @ B.transpose(-1, -2)
        quad = a * (c * c / (lam + a)).sum(-1)
    else:
        s2, V = torch.linalg.eigh(Yw @ Yw.transpose(-1, -2))
        lam = s2.clamp_min(0.0)
        dd = lam + a
        Vt = V.transpose(-1, -2)
        u = (Yw @ dw.unsqueeze(-1)).squeeze(-1)
        w = (V @ ((Vt @ u.unsqueeze(-1)).squeeze(-1) / dd).unsqueeze(-1)).squeeze(-1)
        T = (V * torch.sqrt(a / dd).unsqueeze(-2)) @ Vt
        quad = (dw * dw).sum(-1) - (u * w).sum(-1)
    return w, T, quad, torch.log1p(lam / a).sum(-1)


def gaussian_log_z(inn: Innovations, quad: Tensor, logdet: Tensor) -> float:
    """Approximate ``log N(y; mean h, Y^T Y/(N-1) + R)`` from :func:`transform`'s
    ``quad`` and ``logdet`` (Woodbury and the matrix determinant lemma in whitened
    coordinates, plus ``log det R``)."""
    m = inn.Yw.shape[1]
    return float(-0.5 * (m * _LOG_2PI + inn.logdet_r + logdet + quad))


def random_rotation(
    n: int, generator: torch.Generator | None, device: torch.device | None = None
) -> Tensor:
    """Random orthogonal ``(n, n)`` float64 matrix ``Q`` with ``Q 1 = 1`` and ``1^T Q = 1^T``
    (mean-preserving): ``Q = 1 1^T / n + B O B^T`` with ``B`` ``(n, n-1)`` an orthonormal
    basis of the complement of ``1`` and ``O`` Haar-distributed on ``O(n-1)`` (QR of a
    Gaussian matrix with the signs of ``diag(R)`` fixed; Mezzadri 2007)."""
    f64 = torch.float64
    ones = torch.ones(n, 1, dtype=f64, device=device)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.eye(n, dtype=f64, device=device)], 1))
    B = basis[:, 1:n]
    Z = randn((n - 1, n - 1), generator, device=device, dtype=f64)
    O, Rm = torch.linalg.qr(Z)
    O = O * torch.sign(torch.diagonal(Rm)).unsqueeze(0)
    return ones @ ones.T / n + B @ O @ B.T


class EnsembleKalmanFilter(Filter):
    """Shared post-processing: RTPS (``rtps`` = alpha in [0, 1]), multiplicative
    ``inflation`` (>= 1 usually) of the analysis anomalies, then (``rotate``) a random
    mean-preserving rotation of the members (:func:`random_rotation`)."""

    name = "ensemble-kalman"

    def __init__(self, inflation: float = 1.0, rtps: float = 0.0, rotate: bool = False) -> None:
        if not (math.isfinite(inflation) and inflation > 0):
            raise InputError(f"inflation must be a finite number > 0, got {inflation!r}")
        if not (0.0 <= rtps <= 1.0):
            raise InputError(f"rtps must lie in [0, 1], got {rtps!r}")
        self.inflation = float(inflation)
        self.rtps = float(rtps)
        self.rotate = bool(rotate)

    def _update(self, inn: Innovations, generator: torch.Generator | None) -> tuple[Tensor, float]:
        """Analysis anomalies-plus-mean ``(N, d)`` float64 and the approximate log-evidence."""
        raise NotImplementedError

    def _finish(
        self,
        ensemble: Ensemble,
        inn: Innovations,
        xa: Tensor,
        generator: torch.Generator | None = None,
    ) -> Ensemble:
        mu_a = xa.mean(0)
        Aa = xa - mu_a
        if self.rtps > 0:
            n = xa.shape[0]
            sb = inn.A.pow(2).sum(0).div(n - 1).sqrt()
            sa = Aa.pow(2).sum(0).div(n - 1).sqrt()
            scale = 1.0 + self.rtps * (sb - sa) / sa.clamp_min(1e-300)
            Aa = Aa * torch.where(sa > 0, scale, torch.ones_like(scale))
        if self.inflation != 1.0:
            Aa = Aa * self.inflation
        if self.rotate:
            Aa = random_rotation(Aa.shape[0], generator, Aa.device) @ Aa
        x = ensemble.x
        out = (mu_a + Aa).reshape(x.shape).to(x.dtype)
        return Ensemble(out, ensemble.log_w.clone())

    def analysis(
        self,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Assimilate ``y`` ``(m,)`` into ``ensemble`` ``(N, *S)``; NaN entries are dropped.
        An all-NaN ``y`` returns the ensemble unchanged with ``info["skipped"] = True``."""
        inn = innovations(ensemble, y, obs)
        n = ensemble.size
        if inn is None:
            info = {"ess": float(n), "log_z": 0.0, "inflation": 1.0, "skipped": True}
            return Ensemble(ensemble.x.clone(), ensemble.log_w.clone()), info
        xa, log_z = self._update(inn, generator)
        info = {
            "ess": float(n),
            "log_z": log_z,
            "log_z_approx": True,
            "inflation": self.inflation,
            "skipped": False,
        }
        return self._finish(ensemble, inn, xa, generator), info

    def __repr__(self) -> str:
        rot = ", rotate=True" if self.rotate else ""
        return f"{type(self).__name__}(inflation={self.inflation}, rtps={self.rtps}{rot})"


class ETKF(EnsembleKalmanFilter):
    """Ensemble transform Kalman filter with the symmetric square root (Hunt et al.
    2007; = DAPPER ``EnKF('Sqrt')``). Deterministic: ``generator`` is unused."""

    name = "etkf"

    def _update(self, inn: Innovations, generator: torch.Generator | None) -> tuple[Tensor, float]:
        w, T, quad, logdet = transform(inn.Yw, inn.dw)
        xa = inn.mu + (w.unsqueeze(-1) + T).T @ inn.A
        return xa, gaussian_log_z(inn, quad, logdet)


class EnKF(EnsembleKalmanFilter):
    """Stochastic EnKF with perturbed observations (Burgers et al. 1998; = DAPPER
    ``EnKF('PertObs')``). The perturbations ``z_i ~ N(0, R)`` are drawn from
    ``generator``, centred over members and scaled by ``sqrt(N/(N-1))`` (as DAPPER's
    ``mean0``: the centred draws' spread is restored to that of ``N`` independent ones,
    i.e. ``sum_i z_i z_i^T / N`` has expectation ``R``). Works in observation space
    (``m x m`` Cholesky) when ``m < N``, else in ensemble space."""

    name = "enkf"

    def _update(self, inn: Innovations, generator: torch.Generator | None) -> tuple[Tensor, float]:
        n, m = inn.Yw.shape
        z = randn((n, m), generator, device=inn.Yw.device, dtype=torch.float64)
        z = (z - z.mean(0)) * math.sqrt(n / (n - 1))
        D = inn.dw - inn.Yw + z  # whitened perturbed innovations (N, m)
        if m < n:  # observation space: C = Yw^T Yw + (N-1) I_m, increments D C^{-1} Yw^T A
            C = inn.Yw.T @ inn.Yw + (n - 1) * torch.eye(m, dtype=torch.float64, device=z.device)
            L = torch.linalg.cholesky(C)
            Kw = torch.cholesky_solve(inn.Yw.T @ inn.A, L)  # (m, d)
            xa = inn.mu + inn.A + D @ Kw
            u = torch.cholesky_solve(inn.dw.unsqueeze(-1), L).squeeze(-1)
            quad = (n - 1) * (inn.dw @ u)
            logdet = 2.0 * torch.log(torch.diagonal(L)).sum() - m * math.log(n - 1)
            return xa, gaussian_log_z(inn, quad, logdet)
        s2, V = torch.linalg.eigh(inn.Yw @ inn.Yw.T)
        dd = s2.clamp_min(0.0) + (n - 1)
        Pw = (V / dd) @ V.T  # (Yw Yw^T + (N-1) I)^{-1}
        M = Pw @ (inn.Yw @ D.T)  # (N, N): column i = weights of member i's increment
        xa = inn.mu + inn.A + M.T @ inn.A
        u = inn.Yw @ inn.dw
        quad = inn.dw @ inn.dw - u @ Pw @ u
        return xa, gaussian_log_z(inn, quad, torch.log1p(s2.clamp_min(0.0) / (n - 1)).sum())


_ALIASES = {
    "enkf": "enkf",
    "enkf-pertobs": "enkf",
    "etkf": "etkf",
    "enkf-sqrt": "etkf",
    "sqrt": "etkf",
    "letkf": "letkf",
    "enkf-n": "enkf-n",
    "enkfn": "enkf-n",
}


def make_filter(method: str, **options: Any) -> EnsembleKalmanFilter:
    """Build an ensemble Kalman filter by name for the CLI / configs.

    ``method``: ``enkf`` (stochastic), ``etkf`` (alias ``enkf-sqrt``), ``letkf`` or
    ``enkf-n`` (finite-size EnKF, :class:`assim.filters.enkf_n.EnKFN`).
    ``options``: ``inflation``, ``rtps``; ``rotate`` (not LETKF); LETKF also ``radius``
    (DAPPER's convention, see :class:`assim.filters.letkf.LETKF`), ``periodic``,
    ``cutoff``; EnKF-N also ``x_n``, ``g``, ``mode_correction``. ``None`` values are
    ignored (unset CLI flags); unknown options raise :class:`InputError`."""
    key = _ALIASES.get(str(method).lower())
    if key is None:
        raise InputError(f"unknown ensemble method {method!r}; expected one of {sorted(_ALIASES)}")
    opts = {k: v for k, v in options.items() if v is not None}
    allowed = {"inflation", "rtps"}
    if key == "letkf":
        from assim.filters.letkf import LETKF

        cls: type[EnsembleKalmanFilter] = LETKF
        allowed |= {"radius", "periodic", "cutoff"}
    elif key == "enkf-n":
        from assim.filters.enkf_n import EnKFN

        cls = EnKFN
        allowed |= {"rotate", "x_n", "g", "mode_correction"}
    else:
        cls = EnKF if key == "enkf" else ETKF
        allowed |= {"rotate"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise InputError(
            f"method {method!r} does not take option(s) {bad}; allowed {sorted(allowed)}"
        )
    return cls(**opts)
