"""The exact Kalman filter and Rauch-Tung-Striebel smoother: the oracle of the tests.

Model (Kalman 1960; Rauch, Tung & Striebel 1965; Särkkä 2013, ch. 4 and 8)::

    x_0 ~ N(m0, P0)
    x_k = A x_{k-1} + b + w_k,   w_k ~ N(0, Q)          k = 1..K
    y_k = H x_k + v_k,           v_k ~ N(0, R)

Everything is computed in float64. ``NaN`` entries of ``y_k`` are unobserved: the
update uses the observed rows of ``H`` and the matching block of ``R``; a step with
no observed entry is a pure forecast with evidence increment 0. The log-evidence
increment is ``log N(y_k; H m_k^-, H P_k^- H^T + R)``, so ``sum_k`` is the exact
``log p(y_{1:K})``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble, Filter

_LOG_2PI = math.log(2.0 * math.pi)


class KalmanResult(NamedTuple):
    """Filtering means ``(K, d)``, covariances ``(K, d, d)`` and evidence increments
    ``log p(y_k | y_{1:k-1})`` ``(K,)``."""

    means: Tensor
    covs: Tensor
    log_z: Tensor


def _sym(P: Tensor) -> Tensor:
    return 0.5 * (P + P.transpose(-1, -2))


def kalman_update(
    m: Tensor, P: Tensor, y: Tensor, H: Tensor, R: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One analysis ``(m, P) -> (m_a, P_a)`` for ``y`` ``(m_obs,)`` (NaN = unobserved),
    in Joseph form; returns ``(m_a, P_a, log N(y; H m, H P H^T + R))``."""
    seen = ~torch.isnan(y)
    if not bool(seen.any()):
        return m, P, m.new_zeros(())
    if not bool(seen.all()):
        idx = seen.nonzero().reshape(-1)
        y, H, R = y[idx], H[idx], R[idx][:, idx]
    innov = y - H @ m
    S = _sym(H @ P @ H.T + R)
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        raise InputError(
            "Kalman update: innovation covariance H P H^T + R is not positive definite"
        )
    PHt = P @ H.T
    K = torch.cholesky_solve(PHt.T, L).T
    m_a = m + K @ innov
    IKH = torch.eye(P.shape[0], dtype=P.dtype, device=P.device) - K @ H
    P_a = _sym(IKH @ P @ IKH.T + K @ R @ K.T)
    z = torch.linalg.solve_triangular(L, innov.unsqueeze(-1), upper=False).squeeze(-1)
    log_z = -0.5 * (z @ z) - torch.log(torch.diagonal(L)).sum() - 0.5 * y.shape[0] * _LOG_2PI
    return m_a, P_a, log_z


def _f64(name: str, v: Any, device) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"Kalman filter: {name} contains non-finite values")
    return t


def kalman_filter(
    A: Tensor,
    b: Tensor | None,
    Q: Tensor,
    H: Tensor,
    R: Tensor,
    m0: Tensor,
    P0: Tensor,
    ys: Tensor,
) -> KalmanResult:
    """Filter ``ys`` ``(K, m)`` (NaN allowed) from the prior ``N(m0, P0)`` ``(d,), (d, d)``
    through ``A`` ``(d, d)``, ``b`` ``(d,)`` or None, ``Q`` ``(d, d)``, ``H`` ``(m, d)``,
    ``R`` ``(m, m)``. Returns :class:`KalmanResult` (``x_1..x_K`` given ``y_1..y_k``)."""
    dev = torch.as_tensor(ys).device
    A, Q, H, R = (_f64(n, v, dev) for n, v in (("A", A), ("Q", Q), ("H", H), ("R", R)))
    m, P = _f64("m0", m0, dev), _f64("P0", P0, dev)
    d = m.shape[0]
    b = torch.zeros(d, dtype=torch.float64, device=dev) if b is None else _f64("b", b, dev)
    ys = torch.as_tensor(ys, dtype=torch.float64, device=dev)
    if ys.dim() != 2 or ys.shape[1] != H.shape[0]:
        raise InputError(
            f"Kalman filter: observations must be (K, {H.shape[0]}) to match H, "
            f"got {tuple(ys.shape)}"
        )
    if A.shape != (d, d) or Q.shape != (d, d) or P.shape != (d, d) or H.shape[1] != d:
        raise InputError(
            f"Kalman filter: shapes disagree: m0 {(d,)}, P0 {tuple(P.shape)}, A "
            f"{tuple(A.shape)}, Q {tuple(Q.shape)}, H {tuple(H.shape)}"
        )
    means, covs, log_z = [], [], []
    for y in ys:
        m, P = A @ m + b, _sym(A @ P @ A.T + Q)
        m, P, lz = kalman_update(m, P, y, H, R)
        means.append(m)
        covs.append(P)
        log_z.append(lz)
    return KalmanResult(torch.stack(means), torch.stack(covs), torch.stack(log_z))


def rts_smoother(
    A: Tensor, b: Tensor | None, Q: Tensor, means: Tensor, covs: Tensor
) -> tuple[Tensor, Tensor]:
    """Rauch-Tung-Striebel smoother from the filtering ``means`` ``(K, d)`` and
    ``covs`` ``(K, d, d)``: returns the smoothing means and covariances of
    ``x_k | y_{1:K}``, ``k = 1..K``. ``G_k = P_k A^T (P_{k+1}^-)^{-1}``."""
    dev = means.device
    A, Q = _f64("A", A, dev), _f64("Q", Q, dev)
    d = means.shape[1]
    b = torch.zeros(d, dtype=torch.float64, device=dev) if b is None else _f64("b", b, dev)
    ms, Ps = [means[-1].double()], [covs[-1].double()]
    for k in range(means.shape[0] - 2, -1, -1):
        m, P = means[k].double(), covs[k].double()
        m_pred, P_pred = A @ m + b, _sym(A @ P @ A.T + Q)
        G = torch.linalg.solve(P_pred, A @ P).T  # P A^T P_pred^{-1} (P_pred symmetric)
        ms.append(m + G @ (ms[-1] - m_pred))
        Ps.append(_sym(P + G @ (Ps[-1] - P_pred) @ G.T))
    return torch.stack(ms[::-1]), torch.stack(Ps[::-1])


@dataclass
class GaussianState(Ensemble):
    """A Gaussian filter state: ``x`` ``(1, *S)`` holds the mean, ``cov`` ``(d, d)``
    the covariance, so the runner reads it like an ensemble."""

    cov: Tensor = None  # type: ignore[assignment]

    def mean(self) -> Tensor:
        return self.x[0]

    def var(self) -> Tensor:
        return torch.diagonal(self.cov).reshape(self.x.shape[1:]).to(self.x.dtype)


def _linear_gaussian(world: Any, obs: Any, state_shape) -> tuple[Tensor, ...]:
    for name in ("A", "Q"):
        if not hasattr(world, name):
            raise InputError(
                "the Kalman filter needs a linear-Gaussian world (attributes A, b, Q); "
                f"{type(world).__name__} has no {name}"
            )
    if not obs.linear:
        raise InputError(f"the Kalman filter needs a linear observation operator, got {obs}")
    from assim.obs import GaussianNoise

    if not isinstance(obs.noise, GaussianNoise):
        raise InputError("the Kalman filter needs Gaussian observation noise")
    H = obs.operator.matrix(state_shape, dtype=torch.float64)
    return world.A, getattr(world, "b", None), world.Q, H, obs.noise.covariance(H.shape[0])


class KalmanFilter(Filter):
    """Exact filter for a :class:`~models.worlds.linear_gaussian.LinearGaussian` world
    and a linear Gaussian :class:`~assim.obs.Observation`. ``initialize`` turns the
    initial ensemble into ``N(m0, P0)`` (given, or the ensemble's mean/covariance)."""

    name = "kalman"

    def __init__(self, m0: Tensor | None = None, P0: Tensor | None = None) -> None:
        self.m0, self.P0 = m0, P0

    def initialize(self, ensemble: Ensemble) -> GaussianState:
        x = ensemble.x
        flat = x.reshape(x.shape[0], -1).double()
        m0 = flat.mean(0) if self.m0 is None else torch.as_tensor(self.m0).double()
        if self.P0 is not None:
            P0 = torch.as_tensor(self.P0).double()
        elif x.shape[0] > 1:
            P0 = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
        else:
            P0 = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        m0, P0 = m0.to(x.device), P0.to(x.device)
        return GaussianState(m0.to(x.dtype).reshape(1, *x.shape[1:]), cov=P0)

    def cycle(self, world, ensemble, y, obs, generator=None):
        state = ensemble if isinstance(ensemble, GaussianState) else self.initialize(ensemble)
        A, b, Q, H, R = _linear_gaussian(world, obs, state.x.shape[1:])
        dev = state.x.device
        A, Q, H, R = (torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (A, Q, H, R))
        m = state.x.reshape(-1).double()
        m = A @ m + (0 if b is None else torch.as_tensor(b, dtype=torch.float64, device=dev))
        P = _sym(A @ state.cov @ A.T + Q)
        skipped = y is None or bool(torch.isnan(torch.as_tensor(y)).all())
        lz = m.new_zeros(())
        if not skipped:
            y = torch.as_tensor(y, dtype=torch.float64, device=dev).reshape(-1)
            if y.shape[0] != H.shape[0]:
                raise InputError(
                    f"observation y has {y.shape[0]} entries, the operator gives {H.shape[0]}"
                )
            m, P, lz = kalman_update(m, P, y, H, R)
        out = GaussianState(m.to(state.x.dtype).reshape(state.x.shape), cov=P)
        info = {"ess": math.nan, "log_z": float(lz), "inflation": 1.0, "skipped": skipped}
        return out, info

    def analysis(self, ensemble, y, obs, generator=None):
        raise InputError("KalmanFilter runs through cycle(world, ...), which needs the world")
