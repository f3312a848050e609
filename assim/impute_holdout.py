"""Held-out imputation of fit-period fields: the calibration statistics of the imputation
prior (:func:`assim.impute_prior.fit_field_prior`, steps 4 and 8), and the per-point
spread factor applied to the leave-one-out-like share of the posterior variance
(:func:`scale_local_share`, :func:`fit_spread_sd`).

Local-share spread factor. Write a posterior deviation at a missing point as the sum of a
part shared with the large scales (EOF amplitudes, a gap's interior) and a part that is
determined locally, ``d = d_sh + d_loc``, with variances ``(1 - kappa) v`` and ``kappa v``;
``kappa = v_loo / v_post`` is the share a point would keep with all its neighbours
observed (``v_loo = 1 / (K^{-1})_pp``, the residual's leave-one-out variance; ``v_post``
the posterior variance; ``0 <= kappa <= 1`` by the law of total variance, since
``Var(z_p | z_-p) >= E Var(z_p | z_-p, a) = v_loo``). Scaling only the local part by the
per-point factor ``s``, ``d' = d_sh + s d_loc``, gives the variance
``v' = (1 - kappa) v + kappa s^2 v``. The two parts are not separated in the draws, so
each deviation is multiplied by ``f = sqrt((1 - kappa) + kappa s^2)`` instead: the same
marginal (Gaussian) distribution per point, the mean unchanged (RMSE identical);
``kappa = 1`` is the whole-deviation factor ``s``, ``kappa = 0`` no factor. Inside a
large gap ``kappa -> 0``, so a factor learnt at isolated hidden points no longer narrows
the large-scale spread there.

Two definitions of the local share are offered. ``"local"``: ``kappa = v_loo / v_post``
as above (the share the :meth:`~assim.smoother.GaussianWindowPrior.posterior_scaled`
"local" model scales). ``"resid"`` (:func:`residual_share`): the share the residual
process keeps when the EOF amplitudes ``a`` are known, ``kappa = v_res / v_post`` with
``v_res = Var(z_p | y, a) = K_pp - K_pO K_OO^{-1} K_Op`` (kriging variance of the residual
alone given the step's actual observations); by the law of total variance
``v_post = v_res + Var(E[z_p | y, a] | y)``, so ``1 - kappa`` is exactly the share due to
the unknown EOF amplitudes (the large scales). Inside a gap ``"resid"`` keeps the
residual's unconditioned variance in the local share, ``"local"`` only its
all-neighbours-observed part.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from assim.rng import rand, randn
from assim.smoother import GaussianWindowPrior

if TYPE_CHECKING:
    from assim.impute_prior import FieldPrior

__all__ = [
    "RHO_CANDIDATES",
    "fit_spread_sd",
    "holdout_errors",
    "holdout_mask",
    "holdout_variance_ratio",
    "residual_share",
    "scale_local_share",
    "select_resid_rho",
]

RHO_CANDIDATES = (0.0, 0.2, 0.4, 0.6, 0.8)


def residual_share(
    window: GaussianWindowPrior, z: Tensor, n: int = 64, generator: torch.Generator | None = None
) -> Tensor:
    """``kappa = v_res / v_post`` ``(T, P)`` (module docstring, ``"resid"``) for a window
    ``z`` ``(T, P)`` (NaN = missing), clamped to ``[0, 1]``: ``v_post`` from ``n`` draws of
    the exact posterior (:meth:`~assim.smoother.GaussianWindowPrior.posterior`), ``v_res``
    from ``n`` Matheron draws of the residual alone, ``e - K_{:,O} K_OO^{-1} e_O`` per
    step (a residual AR(1) in time, ``resid_rho``, is ignored in this split)."""
    z = z.to(window.resid_cov)
    smp, _ = window.posterior(z, n, generator)
    cov = window.resid_cov
    full = torch.arange(window.n_points, device=cov.device)
    e = randn((n, *z.shape), generator, device=cov.device, dtype=cov.dtype) @ window._chol(full).T
    obs = torch.isfinite(z)
    for k in range(z.shape[0]):
        io = obs[k].nonzero().squeeze(1)
        if io.numel():
            e[:, k] -= torch.cholesky_solve(e[:, k, io].T, window._chol(io)).T @ cov[io]
    return (e.var(0) / smp.var(0).clamp_min(1e-300)).clamp(0.0, 1.0)


def scale_local_share(smp: Tensor, mean: Tensor, share: Tensor, sd: Tensor) -> Tensor:
    """Samples ``(n, T, P)`` with deviations from ``mean`` ``(T, P)`` multiplied by
    ``f = sqrt((1 - share) + share sd^2)`` (module docstring); ``share`` ``(T, P)`` in
    ``[0, 1]``, ``sd`` ``(P,)``. Entries with ``share = 0`` are returned as they are."""
    sd = sd.to(smp)
    f = ((1 - share) + share * sd**2).sqrt()
    return torch.where(share > 0, mean + (smp - mean) * f, smp)


def fit_spread_sd(w: Tensor, err2: Tensor, var: Tensor, local_var: Tensor | None = None) -> Tensor:
    """Per-point spread factor ``(P,)`` from held-out sums ``(P,)`` (:func:`holdout_errors`)
    smoothed by the weights ``w`` ``(P, P)``, clamped to ``[0.5, 2]``.

    Without ``local_var``: ``s^2 = W err2 / W var`` (the factor multiplies the whole
    deviation). With ``local_var = sum kappa v`` (the local share of ``var``): the moment
    equation ``E err^2 = (1 - kappa) v + kappa s^2 v`` summed over the held-out entries,
    ``s^2 = (W err2 - W (var - local_var)) / W local_var`` (:func:`scale_local_share`);
    equal to the first where ``local_var = var``."""
    if local_var is None:  # the whole variance is "local": w @ (var - var) = 0 exactly
        local_var = var
    s2 = (w @ err2 - w @ (var - local_var)) / (w @ local_var).clamp_min(1e-300)
    return s2.clamp(0.25, 4.0).sqrt()


def _holdout_split(
    prior: FieldPrior,
    z: Tensor,
    n_tr: int,
    generator: torch.Generator | None,
) -> tuple[GaussianWindowPrior, Tensor, Tensor, Tensor]:
    """The held-out imputation problem of :func:`holdout_variance_ratio`: the prior with
    EOFs refitted on ``z[:n_tr]`` (same residual and AR(1) coefficient), the held-out
    fields ``z[n_tr:]``, the hidden entries (:func:`holdout_mask`) and the masked fields."""
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
    hid = holdout_mask(val, generator)
    return sub, val, hid, val.masked_fill(hid, float("nan"))


def holdout_mask(val: Tensor, generator: torch.Generator | None) -> Tensor:
    """Hidden entries of held-out fields ``val`` ``(T, P)``: 30 % at random plus a
    contiguous run of a sixth of the points (a band of rows) at every step."""
    hid = rand(val.shape, generator, device=val.device, dtype=val.dtype) < 0.3
    p = val.shape[1]
    j0 = int(torch.randint(0, max(1, p - p // 6), (1,), generator=generator))
    hid[:, j0 : j0 + p // 6] = True
    return hid


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
    share: str | None = None,
) -> tuple[Tensor, ...]:
    """Per point ``(P,)``: the sums over the held-out steps of the squared error of the
    posterior mean and of the posterior variance (32 draws) at the hidden entries of
    the held-out imputation of :func:`holdout_variance_ratio` (zero where a point was
    never hidden); with ``share`` (``"local"`` or ``"resid"``, module docstring) also
    the sum of ``kappa`` times the variance (its local part). The masks and the draws
    of the first two sums do not depend on ``share``."""
    sub, val, hid, masked = _holdout_split(prior, z, n_tr, generator)
    loc = share == "local"
    out = sub.posterior_scaled(masked, 32, generator, spread, return_share=loc)
    smp, mean = out[0], out[1]
    h = hid.to(val.dtype)
    err2 = ((mean - val) ** 2 * h).sum(0)
    var = (smp.var(0) * h).sum(0)
    if share:
        kappa = out[2] if loc else residual_share(sub, masked, 32, generator)
        local_var = (smp.var(0) * kappa * h).sum(0)
    return (err2, var, local_var) if share else (err2, var)


def select_resid_rho(
    prior: FieldPrior,
    z: Tensor,
    n_tr: int,
    generator: torch.Generator | None = None,
    candidates: tuple[float, ...] = RHO_CANDIDATES,
) -> tuple[float, dict[float, float]]:
    """The lag-1 correlation of an AR(1) residual in time chosen by held-out imputation:
    for each candidate, the summed squared error of the posterior mean at the hidden
    entries of :func:`holdout_errors` (EOFs refitted on ``z[:n_tr]``, the same masks for
    every candidate). Returns ``(rho, {candidate: sse})``.

    Why held out: the in-sample lag-1 correlation of the EOF residual is biased low (even
    negative) when the EOFs are fitted on few fields, because the sample EOFs absorb part
    of each field's residual."""
    # the generator's seed, not its state: the choice leaves the fit's later draws as
    # they were (a prior that keeps a white residual is unchanged by the option)
    seed = 0 if generator is None else int(generator.initial_seed())
    g = torch.Generator(device=z.device).manual_seed(seed)
    sub, val, hid, masked = _holdout_split(prior, z, n_tr, g)
    sse = {}
    for rho in candidates:  # the same split; the factors of K are shared (rho-free)
        cand = dataclasses.replace(sub, resid_rho=float(rho), _chol_cache=sub._chol_cache)
        _, mean = cand.posterior(masked, 0)  # the mean path only
        sse[float(rho)] = float(((mean - val)[hid] ** 2).sum())
    return min(sse, key=sse.get), sse
