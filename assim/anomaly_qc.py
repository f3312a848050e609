"""Background quality control (first-guess check) for the evidence scores of
:mod:`assim.anomaly`.

Without QC, the evidence score of step ``k`` conditions on the *observed* previous field:
``z_k | z_{k-1} ~ N(G z_{k-1}, S)`` (:func:`assim.anomaly.predictive`). A persistent
anomaly (a level shift, a drifting sensor) is then part of the predictor from its second
step on and is absorbed: only its onset and its end look anomalous. Operational data
assimilation rejects such observations instead (background / first-guess check and buddy
check, e.g. Lorenc & Hammon 1988, Ingleby & Lorenc 1993; Dee et al. 2001): an observation
whose standardised innovation exceeds a threshold ``c`` is not assimilated, so the next
forecast does not contain it and the anomaly keeps being flagged.

:func:`qc_filter` runs that scheme as a Kalman filter for the VAR(1) model of the
standardised anomalies implied by the prior, ``z_k = G z_{k-1} + w_k``, ``w_k ~ N(0, S)``,
with every point observed exactly unless rejected:

- forecast ``m_k = G mu_{k-1}``, ``F_k = S + G_{:R} A_{k-1} G_{:R}^T``, where
  ``mu_{k-1}`` is the previous analysis and ``A_{k-1}`` the analysis covariance of the
  points ``R = R_{k-1}`` rejected at ``k-1`` (accepted points are known exactly, so the
  analysis covariance lives on ``R`` only); ``F_0 = Sigma``, ``m_0 = 0``;
- innovation ``r_k = z_k - m_k``; point ``i`` is rejected when the background check
  ``|r_i| / sqrt(F_ii) > c`` fails, or then the buddy (leave-one-out) check among the
  points that passed it, ``|(P r_A)_i| / sqrt(P_ii) > c`` with ``P = (F_AA)^{-1} = Q_AA -
  Q_AR Q_RR^{-1} Q_RA``, ``Q = F_k^{-1}`` (the value of a point rejected by the first
  check does not enter the second);
- analysis: accepted points ``mu_i = z_i``; rejected points get the Gaussian conditional
  on the accepted ones, ``mu_R = m_R - Q_RR^{-1} Q_RA r_A``, ``A_k = Q_RR^{-1}``; the
  rejected values themselves do not enter.

``Q_k`` is updated from the fixed ``Q_S = S^{-1}`` by the Woodbury identity, ``Q_k = Q_S -
W (A_{k-1}^{-1} + G_{:R}^T W)^{-1} W^T`` with ``W = Q_S G_{:R}``, ``O(P^2 |R|)`` per step;
``A_{k-1}^{-1} = (Q_{k-1})_{RR}`` needs no inversion. With nothing rejected the filter is
the unfiltered predictive exactly (``F_k = S``, ``m_k = G z_{k-1}``), so an infinite
``c`` reproduces the scores without QC.

Under the model every innovation ``r_k`` is ``N(0, F_k)`` given the accepted past, so the
per-step statistics keep their null distributions (up to the selection of the rare
rejections on clean data: ``c = 4`` rejects a fraction ``~1e-4`` of clean points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from assim.errors import InputError

if TYPE_CHECKING:
    from assim.impute_prior import FieldPrior

#: default rejection threshold of the first-guess and buddy checks (in standard deviations)
QC_THRESHOLD = 4.0


@dataclass
class QCResult:
    """Output of :func:`qc_filter` for ``T`` steps on ``P`` points.

    ``innov`` ``(T, P)`` innovations ``r_k``; ``analysis`` ``(T, P)`` analysis means
    ``mu_k``; ``rejected`` ``(T, P)`` bool; ``cov_diag`` ``(T, P)`` ``diag F_k``;
    ``factors[k]`` the Woodbury factor ``V_k`` ``(|R_{k-1}|, P)`` with ``Q_k = Q_S - V_k^T
    V_k``, or ``None`` where ``F_k`` is the base covariance (``Sigma`` at ``k = 0``, ``S``
    after); ``q_base`` is ``Q_S`` (``(P, P)`` precisions are rebuilt on demand by
    :meth:`precision`, not stored per step)."""

    innov: Tensor
    analysis: Tensor
    rejected: Tensor
    cov_diag: Tensor
    factors: list
    q_base: Tensor

    def precision(self, k: int) -> Tensor | None:
        """``Q_k = F_k^{-1}`` ``(P, P)``, ``None`` for the base covariance."""
        v = self.factors[k]
        return None if v is None else _woodbury(self.q_base, v)


def _woodbury(q_s: Tensor, v: Tensor) -> Tensor:
    q = q_s - v.T @ v
    return 0.5 * (q + q.T)


def qc_filter(
    gain: Tensor,
    s: Tensor,
    sig: Tensor,
    z: Tensor,
    threshold: float = QC_THRESHOLD,
    q_s: Tensor | None = None,
    q_sig: Tensor | None = None,
    buddy_threshold: float | None = None,
) -> QCResult:
    """Kalman filter of ``z`` ``(T, P)`` under ``z_k = G z_{k-1} + N(0, S)`` (``z_0 ~ N(0,
    Sigma)``) with background and buddy rejection at ``threshold`` (module docstring).

    ``gain`` ``G``, ``s`` ``S``, ``sig`` ``Sigma`` are ``(P, P)``; ``q_s``/``q_sig`` their
    inverses if already computed. ``buddy_threshold`` (default ``threshold``) is the
    buddy check's: with calibration factors ``lam`` of the two statistics
    (:func:`calibrate_evidence`) the calibrated checks are the raw ones at
    ``c sqrt(lam)``; the analysis itself does not depend on a covariance scale."""
    if q_s is None:
        q_s = torch.cholesky_inverse(torch.linalg.cholesky(s))
    if q_sig is None:
        q_sig = torch.cholesky_inverse(torch.linalg.cholesky(sig))
    buddy = threshold if buddy_threshold is None else buddy_threshold
    t, p = z.shape
    innov = torch.empty_like(z)
    analysis = torch.empty_like(z)
    rejected = torch.zeros(t, p, dtype=torch.bool, device=z.device)
    cov_diag = torch.empty_like(z)
    factors: list = []
    mu = torch.zeros(p, dtype=z.dtype, device=z.device)
    rej_prev = torch.zeros(0, dtype=torch.long, device=z.device)
    a_inv = None  # (Q_{k-1})_RR, the inverse analysis covariance on the rejected points
    for k in range(t):
        if k == 0:
            m, q, fd = mu, q_sig, torch.diagonal(sig)
            factors.append(None)
        else:
            m = mu @ gain.T
            if rej_prev.numel() == 0:
                q, fd = q_s, torch.diagonal(s)
                factors.append(None)
            else:
                gr = gain[:, rej_prev]  # (P, nR)
                w = q_s @ gr
                inner = torch.linalg.cholesky(a_inv + gr.T @ w)
                v = torch.linalg.solve_triangular(inner, w.T, upper=False)  # L^{-1} W^T
                q = _woodbury(q_s, v)
                a = torch.cholesky_inverse(torch.linalg.cholesky(a_inv))
                fd = torch.diagonal(s) + ((gr @ a) * gr).sum(1)
                factors.append(v)
        r = z[k] - m
        bad = (r / fd.sqrt()).abs() > threshold  # background check
        bad = bad | _buddy_check(q, r, bad, buddy)
        innov[k], cov_diag[k], rejected[k] = r, fd, bad
        mu = z[k].clone()
        rej_prev = torch.nonzero(bad).flatten()
        if rej_prev.numel():
            acc = ~bad
            a_inv = q[rej_prev][:, rej_prev]
            rhs = q[rej_prev][:, acc] @ r[acc]
            mu[rej_prev] = m[rej_prev] - torch.cholesky_solve(
                rhs[:, None], torch.linalg.cholesky(a_inv)
            ).squeeze(1)
        analysis[k] = mu
    return QCResult(innov, analysis, rejected, cov_diag, factors, q_s)


def _buddy_check(q: Tensor, r: Tensor, bad: Tensor, threshold: float) -> Tensor:
    """Leave-one-out check of the points that passed the background check against each
    other only: with ``A`` the accepted set, the precision of ``r_A`` is the Schur
    complement ``P = Q_AA - Q_AR Q_RR^{-1} Q_RA`` and the statistic ``(P r_A)_i /
    sqrt(P_ii)``; points already rejected are not flagged again."""
    if not bool(bad.any()):  # plain leave-one-out statistic
        stat = (q @ r).abs() / torch.diagonal(q).sqrt()
    else:  # P r_A = (Q r_0)_A - V^T (V r_A), diag P = diag Q_AA - sum V^2, V = L_RR^{-1} Q_RA
        acc = ~bad
        chol = torch.linalg.cholesky(q[bad][:, bad])
        v = torch.linalg.solve_triangular(chol, q[bad][:, acc], upper=False)
        ra = r[acc]
        pr = (q @ torch.where(acc, r, 0.0))[acc] - v.T @ (v @ ra)
        stat = pr.abs() / (torch.diagonal(q)[acc] - (v**2).sum(0)).sqrt()
    out = torch.zeros_like(bad)
    out[~bad] = stat > threshold
    return out


#: default window (steps) of the persistence statistic
PERSIST = 3
#: default block radii of its spatial scan (3x3, 5x5, 7x7, 11x11, 17x17): a scan over the
#: unknown extent of a shift; wider blocks find wide shifts on fine grids (a tenth of a 64²
#: domain is about 20 x 20 points) at a Bonferroni cost of log(5 / 3) in the p-values
SCAN = (1, 2, 3, 5, 8)


def _block_sum(c: Tensor, idx: Tensor, ok: Tensor) -> Tensor:
    """``1^T C_BB 1`` per block (rows of ``idx``, ``ok`` masking missing members); called on
    chunks of points so that ``(chunk, |B|, |B|)`` stays small for wide blocks."""
    return (c[idx[:, :, None], idx[:, None, :]] * (ok[:, :, None] & ok[:, None, :])).sum((1, 2))


def persistence_z(
    nu: Tensor, s: Tensor, nb: Tensor | None, window: int = PERSIST, scale: float = 1.0
) -> Tensor:
    """Space-time GLR statistic of a level shift, ``(T, P)``, from standardised
    innovations ``nu`` ``(T, P)`` (``r_k / sqrt(F_ii)``).

    The shift is modelled as a constant ``delta`` added, from an unknown step on, to the
    block ``B_i`` around each point (``nb`` ``(P, |B|)``, ``-1`` = missing; ``None``:
    the point alone). With the diagonal (independence) approximation the GLR of ``delta``
    on the block mean ``b_k = mean_{j in B_i} nu_{k,j}`` uses its null sd
    ``sigma_b = sqrt(1^T C_BB 1) / |B|``, ``C`` the correlation matrix of ``S``; the block
    means of successive innovations are independent under the model (Kalman innovations
    are white), so for a shift that started ``m`` steps ago ``W_m = sum_{j<m}
    u_{k-j} / sqrt(m) ~ N(0, 1)``, ``u = b / (sigma_b * scale)`` (Willsky & Jones 1976,
    window-limited GLR; Page's CUSUM is the one-sided recursive form). Returned:
    ``max_{m <= min(window, k+1)} |W_m|``; Bonferroni over the ``window`` lags is left to
    the caller."""
    t, p = nu.shape
    if nb is None:
        u = nu / scale
    else:
        ok = nb >= 0
        idx = nb.clamp_min(0)
        n = ok.sum(1).to(nu.dtype)
        b = (nu[:, idx] * ok).sum(-1) / n
        sd = torch.diagonal(s).sqrt()
        c = s / (sd[:, None] * sd[None, :])
        cbb = torch.cat(
            [_block_sum(c, idx[i : i + 256], ok[i : i + 256]) for i in range(0, p, 256)]
        )
        u = b / (cbb.sqrt() / n) / scale
    best = u.abs()
    run = u.clone()
    for m in range(2, window + 1):
        run = run.clone()
        run[m - 1 :] = run[m - 1 :] + u[: t - m + 1]
        best[m - 1 :] = torch.maximum(best[m - 1 :], run[m - 1 :].abs() / m**0.5)
    return best


def calibrate_evidence(
    prior: FieldPrior,
    values: Tensor,
    groups: Tensor,
    valid: np.ndarray | None = None,
    qc: float | None = QC_THRESHOLD,
    scan: tuple[int, ...] = SCAN,
) -> dict:
    """Mean squares of the standardised statistics of :func:`assim.anomaly.evidence_scores` on clean
    fields ``values`` ``(T, P)`` (e.g. the fit period), steps ``k >= 1``: ``innov``
    (``r_i^2 / F_ii``), ``loo`` (``(Qr)_i^2 / Q_ii``), ``block`` (block Mahalanobis
    distance over its dof, after the ``loo`` factor), ``marginal`` (``z_i^2 /
    Sigma_ii``), ``persist<r>`` (the standardised block mean of (vi), ``u^2``, per radius
    of ``scan``). All are 1 in expectation under the prior; a prior whose variances are
    off (too smooth, too wide) gives factors away from 1, and ``evidence_scores(...,
    scales=...)`` divides each statistic by the root of its factor (Desroziers et al.
    2005). With ``qc`` the filter runs at the thresholds calibrated by a first pass
    without QC (``qc sqrt(innov)``, ``qc sqrt(loo)``), as ``evidence_scores`` uses them."""
    from assim.anomaly import (
        _CLIP,
        _block_maha,
        _is_periodic,
        _precision,
        _scan_blocks,
        grid_neighbours,
        predictive,
    )

    z = prior.standardize(values, groups)
    if z.shape[0] < 2 or not bool(torch.isfinite(z).all()):
        raise InputError("calibration needs at least 2 fully observed fields")
    gain, s = prior.cached("predictive", lambda: predictive(prior))
    sig = prior.cached("spatial_cov", prior.window.spatial_cov)
    q_sig, q_s = _precision(prior, True, sig), _precision(prior, False, s)
    nb = grid_neighbours(valid, _is_periodic(prior)) if valid is not None else None
    if qc is None:
        innov, res = z[1:] - z[:-1] @ gain.T, None
        cov_diag = torch.diagonal(s).expand_as(innov)
    else:  # QC at the thresholds calibrated without it, as evidence_scores applies them
        pre = calibrate_evidence(prior, values, groups, None, None, ())
        c_b, c_l = qc * math.sqrt(pre["innov"]), qc * math.sqrt(pre["loo"])
        res = qc_filter(gain, s, sig, z, c_b, q_s, q_sig, c_l)
        innov, cov_diag = res.innov[1:], res.cov_diag[1:]

    def prec(k: int) -> Tensor:  # Q of step k + 1, rebuilt on demand (never all stored)
        q = None if res is None else res.precision(k + 1)
        return q_s if q is None else q

    n = innov.shape[0]
    nu = innov / cov_diag.sqrt()
    qds = torch.stack([torch.diagonal(prec(k)) for k in range(n)]).sqrt()
    loo = torch.stack([innov[k] @ prec(k) for k in range(n)]) / qds
    out = {"innov": float((nu**2).mean()), "loo": float((loo**2).mean())}
    out["marginal"] = float((z[1:] ** 2 / torch.diagonal(sig)).mean())
    if nb is not None:
        qr = (loo / math.sqrt(out["loo"])).clamp(-_CLIP, _CLIP) * qds
        maha = [_block_maha(prec(k), qr[k : k + 1], nb) for k in range(n)]
        out["block"] = float(torch.stack([m / dof for m, dof in maha]).mean())
    for r, nbr in _scan_blocks(prior, valid, scan) if scan else []:
        out[f"persist{r}"] = float((persistence_z(nu, s, nbr, 1) ** 2).mean())
    return out
