"""Non-stationary (heteroscedastic) residual of the imputation prior.

The small-scale residual of standardised anomalies is far from stationary on real
grids: its leave-one-out (LOO) variance under a stationary Matérn kernel varies by two
to three orders of magnitude between grid points (quiet open ocean vs. fronts and
coasts), and the per-point variance is reproducible in time (split-half correlation of
its log: 0.97 on ``ostia_sst`` and ``e1_north_america``). :func:`residual_sd` fits
per-point standard deviations ``s`` of the residual covariance

    K = c diag(s) C diag(s),

with ``C`` the stationary Matérn correlation (nugget included) chosen by
cross-validation; ``K`` is positive definite whenever ``C`` is (a congruence). Keeping
the correlation and letting the variance vary is the simplest non-stationary
covariance (Cressie & Wikle 2011, §4.1; Paciorek & Schervish 2006 also let the
correlation vary). Point-by-point variances are not identifiable with a nearly
noise-free ``C`` (the maximum-likelihood iteration oscillates: neighbours' scales trade
off), so ``log s`` is a spatially *smoothed* half log of the per-point LOO variance
ratio ``g_p = mean_t r_{t,p}^2 Q_pp`` under ``C`` (``Q = C^{-1}``, ``r_p = (Q z)_p /
Q_pp``, Rasmussen & Williams 2006, eq. 5.12). The smoothing bandwidth, and whether to
use ``s`` at all, are chosen by the held-out LOO log predictive density: ``g`` from the
first fields, the score on the last ones (the fit period only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from assim.errors import InputError

__all__ = ["loo_lag_corr", "loo_lpd", "loo_variance_ratio", "residual_sd", "smooth_log"]


def _loo(z: Tensor, prec: Tensor) -> tuple[Tensor, Tensor]:
    qd = torch.diagonal(prec)
    return (z @ prec) / qd, 1.0 / qd


def loo_variance_ratio(z: Tensor, prec: Tensor) -> Tensor:
    """Per-point ``mean_t r_{t,p}^2 / v_p`` ``(P,)`` of fields ``z`` ``(T, P)`` under a
    Gaussian with precision ``prec`` ``(P, P)``: LOO residuals ``r_p = (Q z)_p / Q_pp``
    (``z_p - E[z_p | z_-p]``) and LOO variances ``v_p = 1 / Q_pp`` (R&W eq. 5.12).
    Equal to 1 in expectation at every point when ``z ~ N(0, Q^{-1})``."""
    r, v = _loo(z, prec)
    return (r**2 / v).mean(0)


def loo_lpd(z: Tensor, prec: Tensor, scale: float = 1.0) -> float:
    """Mean LOO log predictive density of the entries of ``z`` ``(T, P)`` under
    ``N(0, scale Q^{-1})``: ``mean log N(r_p; 0, scale v_p)``."""
    r, v = _loo(z, prec)
    v = v * scale
    return float((-0.5 * (r**2 / v + torch.log(2 * math.pi * v))).mean())


def smooth_log(g: Tensor, weights: Tensor) -> Tensor:
    """``exp`` of the weighted average of ``log g`` ``(P,)`` with non-negative weights
    ``(P, P)`` (row ``p``: the weights of every point in the average at ``p``)."""
    return torch.exp((weights @ g.clamp_min(1e-12).log()) / weights.sum(1))


def residual_sd(
    resid: Tensor,
    corr: Tensor,
    smoothers: Sequence[Callable[[], Tensor]],
    n_tr: int,
) -> tuple[Tensor | None, float, int]:
    """Per-point residual standard deviations for ``K = scale diag(s) C diag(s)``.

    ``resid`` ``(T, P)`` residual fields of the fit period, ``corr`` ``C`` ``(P, P)``,
    ``smoothers`` functions returning candidate weight matrices ``W_j`` ``(P, P)``
    (:func:`smooth_log`; built on demand, they are large). Candidate ``j``:
    ``s = sqrt(smooth_log(g, W_j))`` with ``g`` the LOO variance ratio of
    ``resid[:n_tr]`` under ``C``; each candidate and the stationary ``s = 1`` get their
    LOO-optimal scale ``mean(r^2 / v)`` on ``resid[:n_tr]`` and are scored by
    :func:`loo_lpd` on ``resid[n_tr:]``. The winner is refitted on all fields.

    Returns ``(s, scale, j)``: ``s`` ``(P,)`` normalised to median 1 (``None`` and
    ``j = -1`` when the stationary residual wins) and the scale fitted on all fields.
    """
    t, p = resid.shape
    if corr.shape != (p, p):
        raise InputError(f"residual_sd: corr must be ({p}, {p}) for resid (T, {p})")
    if not 1 <= n_tr < t:
        raise InputError(f"residual_sd: n_tr must be in [1, {t - 1}], got {n_tr}")
    resid, corr = resid.double(), corr.double()
    q_c = torch.cholesky_inverse(torch.linalg.cholesky(corr))
    tr, va = resid[:n_tr], resid[n_tr:]

    def prec(sd: Tensor | None) -> Tensor:
        return q_c if sd is None else q_c / (sd[:, None] * sd[None, :])

    def make(w: Callable[[], Tensor] | None, z: Tensor) -> Tensor | None:
        if w is None:
            return None
        weights = w()
        if weights.shape != (p, p):
            raise InputError(f"residual_sd: smoother weights must be ({p}, {p})")
        sd = smooth_log(loo_variance_ratio(z, q_c), weights).sqrt()
        return sd / sd.median()

    best, best_lpd = -1, -math.inf
    for j, w in [(-1, None), *enumerate(smoothers)]:
        q = prec(make(w, tr))
        lpd = loo_lpd(va, q, float(loo_variance_ratio(tr, q).mean()))
        if lpd > best_lpd:
            best, best_lpd = j, lpd
    sd = make(None if best < 0 else smoothers[best], resid)
    return sd, float(loo_variance_ratio(resid, prec(sd)).mean()), best


def loo_lag_corr(resid: Tensor, corr: Tensor, sd: Tensor | None = None) -> float:
    """Lag-1 correlation ``sum_t r_t . r_{t-1} / sum_t |r_{t-1}|^2`` (clamped to
    ``[0, 0.98]``) of the LOO residuals ``r`` of fields ``resid`` ``(T, P)`` under
    ``diag(sd) corr diag(sd)`` (``sd = None``: ``corr``)."""
    prec = torch.cholesky_inverse(torch.linalg.cholesky(corr.double()))
    if sd is not None:
        prec = prec / (sd[:, None] * sd[None, :])
    r, _ = _loo(resid.double(), prec)
    num, den = (r[1:] * r[:-1]).sum(), (r[:-1] ** 2).sum().clamp_min(1e-300)
    return float((num / den).clamp(0.0, 0.98))


def _smoother(oi, bandwidth: float) -> Tensor:
    """Weights ``(P, P)`` of :func:`smooth_log`: the kernel of the residual ``oi`` (a
    :class:`~assim.baselines.MaternOI`; same geometry, Matérn 3/2, no nugget) with length
    ``bandwidth``, cut below 0.01."""
    w = type(oi)(oi.lat, oi.lon, bandwidth, 0.0, 1.0, 1.5).cov()
    return w * (w > 0.01)
