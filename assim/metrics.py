"""Verification metrics on tensors and on xarray objects with named dims (DESIGN.md §2).

Tensor convention: ensembles are ``(N, *B)`` with members first (``member_dim=0``);
xarray convention: the member dim is named (``member_dim="member"``, CF
``realization``), the time dim ``"time"``. Every function accepts either; xarray inputs
return xarray outputs over the remaining dims (via :func:`xarray.apply_ufunc`).

* :func:`rmse`, :func:`rmse_a` (DAPPER's ``rmse.a``: the plain time mean, over scored
  cycles, of the spatial RMS error of the analysis mean).
* :func:`crps_ensemble` -- fair ensemble CRPS (Ferro 2014, QJRMS 140; Gneiting &
  Raftery 2007): ``E|X - y| - E|X - X'| / 2`` with the ``1/(N(N-1))`` pair estimator.
* :func:`energy_score` -- fair energy score, the multivariate analogue.
* :func:`spread_skill` -- ``sqrt((N+1)/N) * spread / RMSE(mean)`` (Fortin et al. 2014),
  1 for a calibrated ensemble.
* :func:`rank_histogram` -- counts of the truth's rank among the members (ties broken
  at random) and the chi-square p-value of uniformity (:func:`scipy.stats.chisquare`).
* :func:`coverage` -- fraction of truths inside the central ``level`` interval.
* :func:`auroc`, :func:`auprc`, :func:`best_f1` -- detection scores for anomalies.
* :func:`ess_summary` -- summary of per-cycle effective sample sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor

from assim.errors import InputError

__all__ = [
    "RankHistogram",
    "auprc",
    "auroc",
    "best_f1",
    "coverage",
    "crps_ensemble",
    "energy_score",
    "ess_summary",
    "rank_histogram",
    "rmse",
    "rmse_a",
    "spread_skill",
]


def _is_xr(a: Any) -> bool:
    return type(a).__module__.startswith("xarray")


def _mdim(member_dim: int | str) -> str:
    """The xarray member dim name (the tensor default ``0`` means ``"member"``)."""
    return "member" if member_dim == 0 else str(member_dim)


def _t(a: Any) -> Tensor:
    return a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))


def _xr_apply(func, ens, truth, member_dim: str, extra_core: Sequence[str] = ()):
    """Apply a tensor score ``func(ens (N, *B, *E), truth (*B, *E))`` to xarray inputs,
    with ``member_dim`` and ``extra_core`` dims moved to the end by apply_ufunc."""
    import xarray as xr

    core = list(extra_core)
    if member_dim not in ens.dims:
        raise InputError(f"ensemble has no member dim {member_dim!r}; dims are {ens.dims}")

    def wrapped(e: np.ndarray, t: np.ndarray) -> np.ndarray:
        k = len(core)
        e = np.moveaxis(e, -1 - k, 0)  # member first
        out = func(torch.as_tensor(e), torch.as_tensor(t))
        return out.cpu().numpy()

    return xr.apply_ufunc(
        wrapped,
        ens,
        truth,
        input_core_dims=[[member_dim, *core], core],
        output_core_dims=[[]],
        join="inner",
    )


# --------------------------------------------------------------------------- errors


def rmse(pred: Any, truth: Any, dim: Any = None) -> Any:
    """Root mean squared error ``sqrt(mean((pred - truth)^2))`` over ``dim`` (int/tuple
    for tensors, name/list for xarray; ``None`` = all dims). NaNs are ignored."""
    if _is_xr(pred) or _is_xr(truth):
        return np.sqrt(((pred - truth) ** 2).mean(dim=dim, skipna=True))
    err2 = (_t(pred) - _t(truth)) ** 2
    if dim is None:
        return err2.nanmean().sqrt()
    return err2.nanmean(dim=dim).sqrt()


def rmse_a(mean: Any, truth: Any, burn_in: int = 0, time_dim: Any = 0) -> float:
    """DAPPER's ``rmse.a``: per cycle, the spatial RMS of ``mean - truth`` over all
    non-time dims; then the plain mean over cycles ``k >= burn_in`` (cycles whose RMS is
    NaN, e.g. skipped, are left out). Tensors ``(K, *S)`` or xarray with ``time_dim``."""
    if _is_xr(mean) or _is_xr(truth):
        name = "time" if time_dim == 0 else time_dim
        err = mean - truth
        per = np.sqrt((err**2).mean(dim=[d for d in err.dims if d != name]))
        per = per.isel({name: slice(burn_in, None)})
        return float(per.mean(skipna=True))
    err = (_t(mean) - _t(truth)).movedim(time_dim, 0)
    per = err.reshape(err.shape[0], -1).pow(2).mean(1).sqrt()[burn_in:]
    if per.numel() == 0:
        raise InputError(f"rmse_a: no cycle left after burn_in={burn_in}")
    return float(per.nanmean())


# --------------------------------------------------------------------------- ensembles


def _crps(ens: Tensor, y: Tensor) -> Tensor:
    n = ens.shape[0]
    if n < 2:
        raise InputError("fair CRPS needs at least 2 members")
    skill = (ens - y).abs().mean(0)
    # sum_{i,j} |x_i - x_j| = 2 sum_i (2i - n + 1) x_(i), x sorted ascending (0-based i)
    xs = ens.sort(0).values
    w = (2 * torch.arange(n, dtype=xs.dtype, device=xs.device) - n + 1).reshape(
        -1, *([1] * (xs.dim() - 1))
    )
    pair = 2 * (w * xs).sum(0)
    return skill - pair / (2 * n * (n - 1))


def crps_ensemble(ens: Any, truth: Any, member_dim: int | str = 0) -> Any:
    """Fair CRPS per element: ``mean_i |x_i - y| - sum_{i,j} |x_i - x_j| / (2 N (N-1))``.
    ``ens`` ``(N, *B)`` (or ``member_dim``), ``truth`` ``(*B)`` -> ``(*B)``."""
    if _is_xr(ens):
        return _xr_apply(_crps, ens, truth, _mdim(member_dim))
    ens = _t(ens).movedim(int(member_dim), 0)
    return _crps(ens, _t(truth).to(ens.dtype))


def _es(ens: Tensor, y: Tensor) -> Tensor:
    n = ens.shape[0]
    if n < 2:
        raise InputError("fair energy score needs at least 2 members")
    e = ens.movedim(0, -2)  # (*B, N, D)
    skill = torch.linalg.vector_norm(e - y.unsqueeze(-2), dim=-1).mean(-1)
    pair = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist").sum((-1, -2))
    return skill - pair / (2 * n * (n - 1))


def energy_score(
    ens: Any, truth: Any, member_dim: int | str = 0, event_dims: Sequence[str] | None = None
) -> Any:
    """Fair energy score ``mean_i ||x_i - y|| - sum_{i != j} ||x_i - x_j|| / (2N(N-1))``
    (Gneiting & Raftery 2007). Tensors: ``ens`` ``(N, *B, D)``, ``truth`` ``(*B, D)``,
    the last axis is the event vector (flatten several first) -> ``(*B)``. xarray:
    ``event_dims`` names the vector dims (stacked), the rest are batch dims."""
    if _is_xr(ens):
        if not event_dims:
            raise InputError("energy_score on xarray needs event_dims (the vector dims)")
        ev = list(event_dims)
        ens_s = ens.stack(_event=ev)
        tr_s = truth.stack(_event=ev)
        return _xr_apply(_es, ens_s, tr_s, _mdim(member_dim), extra_core=["_event"])
    ens = _t(ens).movedim(int(member_dim), 0)
    return _es(ens, _t(truth).to(ens.dtype))


def spread_skill(ens: Any, truth: Any, member_dim: int | str = 0) -> float:
    """``sqrt((N+1)/N) * sqrt(mean unbiased member variance) / RMSE(ensemble mean)``
    over all elements: 1 for a calibrated ensemble (Fortin et al. 2014, JHM 15)."""
    if _is_xr(ens):
        member_dim = _mdim(member_dim)
        n = ens.sizes[member_dim]
        spread2 = float(ens.var(member_dim, ddof=1).mean())
        err2 = float(((ens.mean(member_dim) - truth) ** 2).mean())
    else:
        e = _t(ens).movedim(int(member_dim), 0)
        n = e.shape[0]
        spread2 = float(e.var(0, unbiased=True).mean())
        err2 = float((e.mean(0) - _t(truth).to(e.dtype)).pow(2).mean())
    return math.sqrt((n + 1) / n * spread2 / err2)


@dataclass(frozen=True)
class RankHistogram:
    """``counts`` ``(N + 1,)`` of the truth's rank and the chi-square p-value of the
    uniform hypothesis (small = mis-calibrated)."""

    counts: np.ndarray
    pvalue: float


def rank_histogram(
    ens: Any,
    truth: Any,
    member_dim: int | str = 0,
    generator: torch.Generator | None = None,
) -> RankHistogram:
    """Rank of the truth among the ``N`` members (0..N) for every element, ties broken
    uniformly at random (``generator``), histogram over all elements and
    :func:`scipy.stats.chisquare` against the uniform distribution. NaN truths are
    skipped. The chi-square test assumes independent elements."""
    if _is_xr(ens):
        import xarray as xr

        ens, truth = xr.align(ens, truth, join="inner")
        e = torch.as_tensor(ens.transpose(_mdim(member_dim), *truth.dims).values)
        y = torch.as_tensor(truth.values)
    else:
        e = _t(ens).movedim(int(member_dim), 0)
        y = _t(truth)
    n = e.shape[0]
    e = e.reshape(n, -1).to(torch.float64)
    y = y.reshape(-1).to(torch.float64)
    ok = ~torch.isnan(y)
    e, y = e[:, ok], y[ok]
    below = (e < y).sum(0)
    ties = (e == y).sum(0)
    u = torch.rand(y.shape, generator=generator, dtype=torch.float64)
    rank = below + torch.floor(u * (ties + 1)).long()
    counts = torch.bincount(rank, minlength=n + 1).numpy()
    p = float(scipy.stats.chisquare(counts).pvalue) if counts.sum() > 0 else float("nan")
    return RankHistogram(counts, p)


def coverage(ens: Any, truth: Any, level: float = 0.9, member_dim: int | str = 0) -> float:
    """Fraction of (non-NaN) truths inside the central ``level`` interval of the
    ensemble, the interval given by the ``(1 -+ level)/2`` member quantiles
    (linear interpolation, :func:`torch.quantile`)."""
    if not 0 < level < 1:
        raise InputError(f"coverage: level must lie in (0, 1), got {level!r}")
    if _is_xr(ens):
        import xarray as xr

        ens, truth = xr.align(ens, truth, join="inner")
        e = torch.as_tensor(ens.transpose(_mdim(member_dim), *truth.dims).values)
        y = torch.as_tensor(truth.values)
    else:
        e, y = _t(ens).movedim(int(member_dim), 0), _t(truth)
    e = e.reshape(e.shape[0], -1).to(torch.float64)
    y = y.reshape(-1).to(torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(e, q, dim=0)
    ok = ~torch.isnan(y)
    inside = (y >= lo) & (y <= hi)
    return float(inside[ok].double().mean())


# --------------------------------------------------------------------------- detection


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.values if _is_xr(scores) else _t(scores).cpu(), dtype=np.float64)
    lab = np.asarray(labels.values if _is_xr(labels) else _t(labels).cpu()).astype(bool)
    if s.shape != lab.shape:
        raise InputError(f"scores {s.shape} and labels {lab.shape} must have the same shape")
    s, lab = s.reshape(-1), lab.reshape(-1)
    ok = ~np.isnan(s)
    s, lab = s[ok], lab[ok]
    if lab.all() or not lab.any():
        raise InputError("detection scores need both positive and negative labels")
    return s, lab


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve = ``P(score_pos > score_neg) + P(tie)/2``, computed from
    average ranks (Mann–Whitney U / (n_pos n_neg)); NaN scores are dropped."""
    s, lab = _scores_labels(scores, labels)
    r = scipy.stats.rankdata(s)
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    u = r[lab].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _pr_curve(s: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and thresholds at every distinct score (descending)."""
    order = np.argsort(-s, kind="mergesort")
    s, lab = s[order], lab[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each tie block
    tp = np.cumsum(lab)[last]
    fp = (last + 1) - tp
    return tp / (tp + fp), tp / lab.sum(), s[last]


def auprc(scores: Any, labels: Any) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds (the
    step-wise area under the precision–recall curve; no interpolation)."""
    p, r, _ = _pr_curve(*_scores_labels(scores, labels))
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def best_f1(scores: Any, labels: Any) -> tuple[float, float]:
    """The largest F1 over thresholds ``score >= t`` and that threshold ``t``."""
    p, r, t = _pr_curve(*_scores_labels(scores, labels))
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    k = int(np.argmax(f1))
    return float(f1[k]), float(t[k])


def ess_summary(ess: Any, n: int | None = None) -> dict[str, float]:
    """Summary of per-cycle effective sample sizes: mean, median, min, and with the
    ensemble size ``n`` the mean relative ESS and the fraction of cycles with
    ESS < n/10 (collapse)."""
    e = np.asarray(ess.values if _is_xr(ess) else _t(ess).cpu(), dtype=np.float64).reshape(-1)
    e = e[~np.isnan(e)]
    if e.size == 0:
        raise InputError("ess_summary: no finite ESS value")
    out = {"mean": float(e.mean()), "median": float(np.median(e)), "min": float(e.min())}
    if n is not None:
        out["mean_relative"] = float(e.mean() / n)
        out["frac_collapsed"] = float((e < n / 10).mean())
    return out
