"""Anomaly scores per grid point and time, and thresholds for a target false-alarm rate.

Inputs are fields ``(T, P)`` over the valid points (see :func:`assim.impute.field_points`)
and a :class:`~assim.impute.FieldPrior`; scores are ``(T, P)``, larger = more anomalous.

- :func:`evidence_scores` -- the predictive distribution of step ``k`` given step
  ``k-1`` under the space-time Gaussian prior, ``z_k | z_{k-1} ~ N(m_k, S)`` (the
  evidence increment ``log p(z_k | z_{k-1})`` of an exact Kalman step), decomposed per
  point into p-values of (i) the standardised innovation ``(z_k - m_k)_i / sqrt(S_ii)``,
  (ii) its leave-one-out version given the rest of the field, ``(Q r)_i / sqrt(Q_ii)``
  with ``Q = S^{-1}`` (Rasmussen & Williams eq. 5.12), (iii) the leave-block-out
  Mahalanobis distance of the 3x3 neighbourhood, ``(Qr)_B^T Q_BB^{-1} (Qr)_B ~
  chi2_|B|`` (LOO residuals winsorised at 2.5 sd so that one spike does not flag its
  neighbours), (iv) a *typicality* p-value of the raw increment ``D = x_k - x_{k-1}``
  (its mean is the change of climatology), ``P(|D_i| <= |d_obs|)`` (Nalisnick et al.
  2019): a frozen field or a stuck sensor is too likely under the model, not too
  unlikely, and (v) the marginal standardised
  anomaly ``z_i / sqrt(Sigma_ii)`` and (vi) a space-time GLR of a level shift on the
  3x3 block over the last ``L`` steps (:func:`assim.anomaly_qc.persistence_z`). The score
  is ``-log10`` of the smallest p-value times the number of tests (Bonferroni);
  thresholds are set on clean data anyway. With ``qc`` the predictor is a Kalman filter
  with background quality control (:mod:`assim.anomaly_qc`): observations failing a
  first-guess or buddy check are not assimilated, so a persistent anomaly is not
  absorbed into the next step's prediction.
  :func:`assim.anomaly_qc.calibrate_evidence` rescales the statistics to unit variance
  on clean (fit-period) fields when the prior's variances are off.
- :func:`imputation_scores` -- ImDiffusion-style (Chen et al. 2023): hide one of
  ``n_groups`` interleaved groups of points at a time, impute it from everything else
  (space-time), score ``|x - mean| / spread`` of the imputed samples.
- :func:`dte_scores` -- diffusion-time estimate (Livernoche et al. 2024): the posterior
  over diffusion time ``p(t | x) ∝ N(x; 0, alpha_t^2 Sigma + sigma_t^2 I)`` (analytic for
  the Gaussian prior, uniform prior on a ``t`` grid); per point the denoising residual
  at ``t_hat = E[t | x]``, standardised: ``|(C^{-1} x)_i| / sqrt(C^{-1}_ii)`` with
  ``C = alpha^2 Sigma + sigma^2 I``. The field-level ``t_hat`` is returned too.
- :func:`threshold_for_far` / :func:`flags` -- the ``1 - far`` quantile of scores on
  clean data, and the exceedances.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from assim.anomaly_qc import PERSIST, SCAN, persistence_z, qc_filter
from assim.errors import InputError
from assim.impute import impute_array
from assim.impute_prior import FieldPrior

_SQRT2 = math.sqrt(2.0)
_CLIP = 2.5  # winsorisation of LOO residuals (in sd) inside the block statistic


def _two_sided_log10p(zs: Tensor) -> Tensor:
    """``log10 P(|N(0,1)| >= |z|)`` computed stably (``erfc``, then its asymptotic log)."""
    a = zs.abs() / _SQRT2
    p = torch.special.erfc(a)
    asym = -(a**2) - torch.log(a * math.sqrt(math.pi)).clamp_min(-50)
    return torch.where(p > 1e-300, p.clamp_min(1e-300).log(), asym) / math.log(10)


def _chi2_log10sf(q: Tensor, dof: Tensor) -> Tensor:
    """``log10 P(chi2_dof >= q)`` (regularised upper incomplete gamma)."""
    sf = torch.special.gammaincc(dof / 2, q / 2).clamp_min(1e-300)
    return sf.log10()


def grid_neighbours(valid: np.ndarray, periodic_lon: bool = False, radius: int = 1) -> Tensor:
    """Indices ``(P, (2 radius + 1)^2)`` of the square neighbourhood of every valid point
    (C order), ``-1`` where the neighbour is land or outside the grid."""
    nlat, nlon = valid.shape
    index = np.full(valid.shape, -1, dtype=np.int64)
    index[valid] = np.arange(int(valid.sum()))
    ii, jj = np.nonzero(valid)
    out = []
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            i, j = ii + di, jj + dj
            if periodic_lon:
                j = j % nlon
            ok = (i >= 0) & (i < nlat) & (j >= 0) & (j < nlon)
            v = np.full(ii.shape, -1, dtype=np.int64)
            v[ok] = index[i[ok], j[ok]]
            out.append(v)
    return torch.from_numpy(np.stack(out, 1))


def predictive(prior: FieldPrior) -> tuple[Tensor, Tensor]:
    """One-step predictive operator of the prior given a fully observed previous field:
    ``m_k = G z_{k-1}`` with ``G = rho_e I + (U R - rho_e U) P_a U^T K^{-1}`` and
    covariance ``S = B P_a B^T + U Lambda (1 - R^2) U^T + (1 - rho_e^2) K``, ``B = U R -
    rho_e U``, ``P_a = (Lambda^{-1} + U^T K^{-1} U)^{-1}`` (exact Kalman step for the
    amplitudes; the residual ``e_{k-1} = z_{k-1} - U a_{k-1}`` carries over with its AR(1)
    coefficient ``rho_e``, 0 for a residual white in time). Returns ``(G, S)`` ``(P, P)``."""
    w = prior.window
    u, lam, rho, k = w.basis, w.lam, w.rho, w.resid_cov
    re = float(w.resid_rho)
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    if w.rank == 0:
        return re * eye, (1 - re**2) * k
    chol = torch.linalg.cholesky(k)
    kinv_u = torch.cholesky_solve(u, chol)
    pa = torch.linalg.inv(torch.diag(1 / lam) + u.T @ kinv_u)
    b = u * rho - re * u
    gain = re * eye + b @ pa @ kinv_u.T
    cov = b @ pa @ b.T + (u * (lam * (1 - rho**2))) @ u.T + (1 - re**2) * k
    return gain, 0.5 * (cov + cov.T)


def evidence_scores(
    prior: FieldPrior,
    values: Tensor,
    groups: Tensor,
    valid: np.ndarray | None = None,
    qc: float | None = None,
    persist: int = PERSIST,
    scales: dict | None = None,
    scan: tuple[int, ...] = SCAN,
) -> Tensor:
    """``-log10`` of the Bonferroni-adjusted smallest p-value of the statistics (i)-(v) of
    the module docstring (and (vi) below), ``(T, P)``. The first step has no predecessor:
    its innovation is taken against the marginal ``N(0, Sigma)`` and its increment and
    persistence tests are skipped. ``valid`` (the grid's valid-point mask) enables the
    3x3 block statistic.

    - ``qc``: rejection threshold (in sd) of the background/buddy quality control of
      :mod:`assim.anomaly_qc`; rejected points are not assimilated, so the predictor of
      the next step does not absorb a persistent anomaly, and (i)-(iii) are taken against
      the filter's forecast ``N(m_k, F_k)``. ``None`` (the default: the QC filter costs
      a dense ``P x P`` update per rejecting step, minutes on grids of thousands of
      points) conditions on the observed previous field; ``inf`` gives the same scores.
      :data:`assim.anomaly_qc.QC_THRESHOLD` (4 sd) is the benchmark's setting.
    - ``persist``: window ``L`` of (vi), the space-time GLR of a level shift of
      :func:`assim.anomaly_qc.persistence_z`; ``1`` (or less) leaves it out. ``scan``:
      its block radii (``1``: 3x3, ``2``: 5x5, ...): a scan over the unknown extent of
      the shift, Bonferroni over radii and lags.
    - ``scales``: mean squares of the standardised statistics on clean data
      (:func:`assim.anomaly_qc.calibrate_evidence`); the statistics are divided by
      their root (the innovation-variance check of Desroziers et al. 2005, one factor
      per statistic).
      ``None``: the model's own variances.

    With ``qc=None``, ``persist=1``, ``scales=None`` the scores are those of the
    predictive alone (the historical default)."""
    z = prior.standardize(values, groups)
    if not bool(torch.isfinite(z).all()):
        raise InputError("evidence scores need fully observed fields (impute gaps first)")
    sc = {} if scales is None else scales
    gain, s = prior.cached("predictive", lambda: predictive(prior))
    sig = prior.cached("spatial_cov", prior.window.spatial_cov)
    q_sig, q_s = _precision(prior, True, sig), _precision(prior, False, s)
    nb = grid_neighbours(valid, _is_periodic(prior)) if valid is not None else None
    inc_var = 2 * torch.diagonal(sig) - 2 * prior.window.lag_cov_diag()
    if qc is None:  # innovations against the observed previous field
        innov = torch.cat([z[:1], z[1:] - z[:-1] @ gain.T])
        qc_steps: list = []
        cov_diag = torch.diagonal(s).expand_as(z).clone()
        cov_diag[0] = torch.diagonal(sig)
    else:
        c_b, c_l = qc * _root(sc, "innov"), qc * _root(sc, "loo")
        res = qc_filter(gain, s, sig, z, c_b, q_s, q_sig, c_l)
        innov, cov_diag = res.innov, res.cov_diag
        qc_steps = [k for k in range(z.shape[0]) if res.factors[k] is not None]
    t = z.shape[0]
    logs = [torch.zeros_like(z) for _ in range(3 if nb is not None else 2)]
    batches = [] if 0 in qc_steps else [([0], q_sig)]
    batches.append(([k for k in range(1, t) if k not in qc_steps], q_s))
    batches += [([k], None) for k in qc_steps]  # Q_k rebuilt one step at a time
    for ks, q in batches:
        if ks:
            qk = res.precision(ks[0]) if q is None else q
            lg = _innovation_logs(innov[ks], cov_diag[ks[0]], qk, nb, sc)
            for acc, v in zip(logs, lg, strict=True):
                acc[ks] = v
    out = torch.empty_like(z)
    n0 = len(logs)
    out[:1] = -(torch.stack([lg[:1] for lg in logs]).min(0).values + math.log10(n0)).clamp_max(0)
    if t == 1:
        return out
    logs = [lg[1:] for lg in logs]
    # marginal standardised anomaly (the innovation's for k = 0)
    logs.append(_two_sided_log10p(z[1:] / torch.diagonal(sig).sqrt() / _root(sc, "marginal")))
    # raw increment x_k - x_{k-1} ~ N(m_k - m_{k-1}, s^2 inc_var) (in units of s):
    # P(|D| <= |d_obs|), zero for an exact repeat whatever the seasonal change
    d = ((values[1:] - values[:-1]).double() / prior.clim_std).abs()
    g = groups.long()
    mu = (prior.clim_mean[g[1:]] - prior.clim_mean[g[:-1]]) / prior.clim_std
    sd = inc_var.sqrt()
    p_small = torch.special.ndtr((d - mu) / sd) - torch.special.ndtr((-d - mu) / sd)
    logs.append(p_small.clamp_min(1e-300).log10())
    if persist > 1:
        nu = innov / cov_diag.sqrt()
        lp = [
            _two_sided_log10p(persistence_z(nu, s, nbr, persist, _root(sc, f"persist{r}"))[1:])
            for r, nbr in _scan_blocks(prior, valid, scan)
        ]
        logs.append(torch.stack(lp).min(0).values + math.log10(persist * len(lp)))
    lp = torch.stack(logs).min(0).values + math.log10(len(logs))
    out[1:] = -lp.clamp_max(0.0)
    return out


def _scan_blocks(prior: FieldPrior, valid: np.ndarray | None, scan: tuple[int, ...]) -> list:
    """``[(radius, neighbours (P, (2r+1)^2))]``; one entry ``(1, None)`` without a grid."""
    if valid is None:
        return [(1, None)]
    key = f"scan_{valid.shape}_{hash(valid.tobytes())}"
    nbs = prior.cached(key, lambda: {})
    for r in scan:
        if r not in nbs:
            nbs[r] = grid_neighbours(valid, _is_periodic(prior), r)
    return [(r, nbs[r]) for r in scan]


def _root(scales: dict, key: str) -> float:
    return math.sqrt(scales.get(key, 1.0))


def _precision(prior: FieldPrior, first: bool, cov: Tensor) -> Tensor:
    return prior.cached(
        f"precision_{first}", lambda: torch.cholesky_inverse(torch.linalg.cholesky(cov))
    )


def _innovation_logs(
    r: Tensor, cov_diag: Tensor, q: Tensor, nb: Tensor | None, scales: dict
) -> list:
    """``log10`` p-values (i)-(iii) of innovations ``r`` ``(n, P)`` with covariance
    diagonal ``cov_diag`` ``(P,)`` and precision ``q`` ``(P, P)``."""
    qd = torch.diagonal(q)
    nu = r / cov_diag.sqrt()
    qr = r @ q
    loo = qr / qd.sqrt()
    if scales:
        nu, loo = nu / _root(scales, "innov"), loo / _root(scales, "loo")
        qr = loo * qd.sqrt()
    logs = [_two_sided_log10p(nu), _two_sided_log10p(loo)]
    if nb is not None:  # winsorised so one outlier does not flag its neighbours
        qr_w = loo.clamp(-_CLIP, _CLIP) * qd.sqrt()
        logs.append(_block_log10p(q, qr_w, nb, scales.get("block", 1.0)))
    return logs


def _is_periodic(prior: FieldPrior) -> bool:
    return prior.geometry == "torus" or float(prior.lon.max() - prior.lon.min()) > 300


def _block_log10p(q: Tensor, qr: Tensor, nb: Tensor, scale: float = 1.0) -> Tensor:
    """Leave-block-out chi-square p-values ``(T, P)`` for the 3x3 blocks ``nb`` (P, 9);
    the Mahalanobis distances are divided by ``scale``."""
    maha, dof = _block_maha(q, qr, nb)
    if scale != 1.0:
        maha = maha / scale
    return _chi2_log10sf(maha, dof)  # block centred at each point


def _block_maha(q: Tensor, qr: Tensor, nb: Tensor) -> tuple[Tensor, Tensor]:
    """``(Qr)_B^T Q_BB^{-1} (Qr)_B`` ``(T, P)`` and the block sizes ``(P,)``."""
    ok = nb >= 0
    idx = nb.clamp_min(0)
    qbb = q[idx[:, :, None], idx[:, None, :]]  # (P, 9, 9)
    m = ok[:, :, None] & ok[:, None, :]
    eye = torch.eye(9, dtype=q.dtype)
    qbb = torch.where(m, qbb, eye)  # missing neighbours decouple
    v = qr[:, idx] * ok  # (T, P, 9)
    sol = torch.linalg.solve(qbb, v.transpose(0, 1).transpose(1, 2))  # (P, 9, T)
    maha = (v.transpose(0, 1) * sol.transpose(1, 2)).sum(-1).T  # (T, P)
    return maha, ok.sum(1).to(q.dtype)


def imputation_scores(
    prior: FieldPrior,
    values: Tensor,
    groups: Tensor,
    n_groups: int = 4,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
    window: int = 12,
) -> Tensor:
    """``|x - mean| / sd`` of each point imputed with its group hidden, ``(T, P)``; groups
    are a seeded random partition of the points, the same at every step. The prior's
    fixed (held-out calibrated) spread is used whatever its ``spread`` model: a spread
    learnt from the window's innovations would widen around the anomalies it should
    reveal."""
    prior = dataclasses.replace(prior, spread="fixed", var_factor=1.0)
    t, p = values.shape
    perm = torch.randperm(p, generator=generator)
    out = torch.full((t, p), float("nan"), dtype=torch.float64)
    for g in range(n_groups):
        idx = perm[g::n_groups]
        masked = values.clone().double()
        masked[:, idx] = float("nan")
        smp, mean = impute_array(prior, masked, groups, n_samples, generator, window)
        sd = smp[:, :, idx].std(0).clamp_min(1e-12)
        out[:, idx] = (values[:, idx].double() - mean[:, idx]).abs() / sd
    return out


def dte_scores(
    prior: FieldPrior,
    values: Tensor,
    groups: Tensor,
    schedule=None,
    n_t: int = 64,
) -> tuple[Tensor, Tensor]:
    """Diffusion-time estimate: per-point scores ``(T, P)`` and ``t_hat`` ``(T,)``.

    ``schedule`` is a ``models.diffusion`` schedule (default ``CosineVP()``); the noise
    posterior is evaluated on ``n_t`` times in ``[0, 1]`` from the eigendecomposition of
    the prior's marginal covariance."""
    if schedule is None:
        from models.diffusion.schedules import CosineVP

        schedule = CosineVP()
    z = prior.standardize(values, groups)
    lam, v = prior.cached("eigh", lambda: torch.linalg.eigh(prior.window.spatial_cov()))
    lam = lam.clamp_min(1e-10)
    ts = torch.linspace(0.0, 1.0, n_t, dtype=torch.float64)
    a, s = schedule(ts)
    a, s = a.double(), s.double()
    c = z @ v  # (T, P)
    var = a[:, None] ** 2 * lam + s[:, None] ** 2  # (n_t, P)
    ll = -0.5 * ((c**2)[:, None, :] / var + var.log()).sum(-1)  # (T, n_t)
    post = torch.softmax(ll, 1)
    t_hat = post @ ts
    a_h, s_h = schedule(t_hat)
    var_h = a_h.double()[:, None] ** 2 * lam + s_h.double()[:, None] ** 2  # (T, P)
    cinv_x = (c / var_h) @ v.T
    cinv_diag = (v**2 @ (1 / var_h).T).T  # (T, P)
    return cinv_x.abs() / cinv_diag.sqrt(), t_hat


def threshold_for_far(clean_scores: Tensor, far: float = 0.01) -> float:
    """The ``1 - far`` quantile of scores on clean data (NaN ignored)."""
    if not 0 < far < 1:
        raise InputError(f"false-alarm rate must be in (0, 1), got {far}")
    s = clean_scores[torch.isfinite(clean_scores)]
    if s.numel() == 0:
        raise InputError("no finite clean scores to choose a threshold from")
    return float(torch.quantile(s.double(), 1 - far))


def flags(scores: Tensor, threshold: float) -> Tensor:
    """Boolean exceedances ``scores > threshold``."""
    return scores > threshold


def score_fields(
    prior: FieldPrior,
    method: str,
    values: Tensor,
    groups: Tensor,
    valid: np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict]:
    """Scores ``(T, P)`` of one method (``evidence``, ``imputation`` or ``dte``) and extra
    per-step outputs (``t_hat`` for DTE)."""
    if method == "evidence":
        return evidence_scores(prior, values, groups, valid), {}
    if method == "imputation":
        return imputation_scores(prior, values, groups, generator=generator), {}
    if method == "dte":
        s, t_hat = dte_scores(prior, values, groups)
        return s, {"t_hat": t_hat}
    raise InputError(f"unknown method {method!r}; expected evidence, imputation or dte")


def clean_threshold(
    prior: FieldPrior,
    method: str,
    far: float,
    valid: np.ndarray | None = None,
    n_steps: int = 48,
    generator: torch.Generator | None = None,
) -> float:
    """Threshold for a target false-alarm rate from ``n_steps`` clean fields drawn from
    the prior (one space-time window; season index cycling through the groups)."""
    groups = torch.arange(n_steps) % prior.n_groups
    z = prior.window.sample(1, n_steps, generator)[0]
    clean = prior.destandardize(z, groups)
    scores, _ = score_fields(prior, method, clean, groups, valid, generator)
    return threshold_for_far(scores, far)
