"""Held-out imputation of fit-period fields: the calibration statistics of the imputation
prior (:func:`assim.impute_prior.fit_field_prior`, steps 4 and 8)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from assim.rng import rand
from assim.smoother import GaussianWindowPrior

if TYPE_CHECKING:
    from assim.impute_prior import FieldPrior

__all__ = ["holdout_errors", "holdout_variance_ratio"]


def holdout_variance_ratio(
    prior: FieldPrior,
    z: Tensor,
    n_tr: int,
    generator: torch.Generator | None = None,
    spread: str = "fixed",
) -> float:
    """Global variance factor ``c = mean(err^2) / mean(posterior var)`` of imputing 30 %
    of the points at random and a contiguous band of a sixth of them in the held-out
    fields ``z[n_tr:]`` with EOFs refitted on ``z[:n_tr]``
    (same residual). Scaling the whole prior covariance by ``c`` leaves the posterior
    mean of exactly observed data unchanged and calibrates its spread; clamped to
    ``[0.5, 4]``. ``spread``: the posterior spread model the factor is fitted for
    (:meth:`~assim.smoother.GaussianWindowPrior.posterior_scaled`)."""
    err2, var = holdout_errors(prior, z, n_tr, generator, spread)
    return float((err2.sum() / var.sum()).clamp(0.5, 4.0))


def holdout_errors(
    prior: FieldPrior,
    z: Tensor,
    n_tr: int,
    generator: torch.Generator | None = None,
    spread: str = "fixed",
) -> tuple[Tensor, Tensor]:
    """Per point ``(P,)``: the sums over the held-out steps of the squared error of the
    posterior mean and of the posterior variance (32 draws) at the hidden entries of
    the held-out imputation of :func:`holdout_variance_ratio` (zero where a point was
    never hidden)."""
    r = prior.basis.shape[1]
    _, s, vh = torch.linalg.svd(z[:n_tr], full_matrices=False)
    sub = GaussianWindowPrior(
        vh[:r].T.contiguous(),
        (s[:r] ** 2 / n_tr).clamp_min(1e-8),
        prior.rho,
        prior.window.resid_cov,
        prior.resid_rho,
    )
    val = z[n_tr:].clone()
    hid = rand(val.shape, generator, device=val.device, dtype=val.dtype) < 0.3
    p = val.shape[1]  # plus a contiguous run of a sixth of the points (a band of rows)
    j0 = int(torch.randint(0, max(1, p - p // 6), (1,), generator=generator))
    hid[:, j0 : j0 + p // 6] = True
    masked = val.masked_fill(hid, float("nan"))
    step = max(1, 6144 // p) if sub.resid_rho else val.shape[0]  # dense posterior: cap T P
    err2 = torch.zeros(p, dtype=val.dtype, device=val.device)
    var = torch.zeros_like(err2)
    for k0 in range(0, val.shape[0], step):
        sl = slice(k0, k0 + step)
        smp, mean = sub.posterior_scaled(masked[sl], 32, generator, spread)
        h = hid[sl].to(val.dtype)
        err2 = err2 + ((mean - val[sl]) ** 2 * h).sum(0)
        var = var + (smp.var(0) * h).sum(0)
    return err2, var
