"""Pieces of the imputation prior's fit (:func:`assim.impute_prior.fit_field_prior`):
the Matérn residual kernel by leave-one-out cross-validation on the sphere or the
periodic square (:class:`TorusMatern`, :func:`fit_residual`) and the EOF rank by
held-out probabilistic-PCA likelihood (:func:`select_rank`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from assim.baselines import MaternOI, fit_matern_oi, matern
from assim.errors import InputError

__all__ = ["TorusMatern", "fit_residual", "select_rank"]


class TorusMatern(MaternOI):
    """:class:`~assim.baselines.MaternOI` on the periodic square ``[0, 2 pi)^2``: ``lat``
    and ``lon`` hold ``y`` and ``x`` in radians and the distance is the chordal one of
    the flat-torus embedding ``(cos x, sin x, cos y, sin y)`` in R^4 (periodic, ~Euclidean
    at short range; a Matérn kernel of a Euclidean distance is positive definite in any
    dimension, so the kernel is too). ``length`` is in radians."""

    def cov(self, idx_a: Tensor | None = None, idx_b: Tensor | None = None) -> Tensor:
        full = torch.arange(self.lat.numel(), device=self.lat.device)
        ia = full if idx_a is None else idx_a
        ib = full if idx_b is None else idx_b

        def emb(i: Tensor) -> Tensor:
            y, x = self.lat[i].double(), self.lon[i].double()
            return torch.stack([x.cos(), x.sin(), y.cos(), y.sin()], -1)

        d = torch.cdist(emb(ia), emb(ib), compute_mode="donot_use_mm_for_euclid_dist")
        c = (1 - self.nugget) * matern(d, self.length, self.nu)
        c = c + self.nugget * (ia[:, None] == ib[None, :]).double()
        return self.scale * c


def fit_residual(
    z: Tensor, lat: Tensor, lon: Tensor, geometry: str = "sphere", generator=None
) -> MaternOI:
    """Matérn residual by leave-one-out CV on fully observed fields ``z`` ``(T, P)``:
    :func:`assim.baselines.fit_matern_oi` on the sphere; on the torus the same LOO
    log predictive density over lengths (radians) and nuggets (at most 2000 points)."""
    if geometry == "sphere":
        return fit_matern_oi(z, lat, lon, generator=generator)
    if geometry != "torus":
        raise InputError(f"geometry must be 'sphere' or 'torus', got {geometry!r}")
    p = z.shape[1]
    sub = torch.randperm(p, generator=generator)[:2000] if p > 2000 else torch.arange(p)
    best, best_score = None, -math.inf
    for length in (0.1, 0.2, 0.4, 0.8, 1.6):
        for nug in (0.002, 0.01, 0.05, 0.2):
            oi = TorusMatern(lat[sub].double(), lon[sub].double(), length, nug, 1.0)
            r, v = oi.loo(z[:, sub].double())
            sc = float((r**2 / v).mean())
            lpd = float((-0.5 * (r**2 / (v * sc) + torch.log(2 * math.pi * v * sc))).mean())
            if lpd > best_score:
                best, best_score = (length, nug, sc), lpd
    return TorusMatern(lat.double(), lon.double(), *best)


def _ppca_val_loglik(u: Tensor, lam: Tensor, d: Tensor, z: Tensor) -> float:
    """Mean log N(z_k; 0, U diag(lam) U^T + diag(d)) over the rows of ``z`` (Woodbury)."""
    p = z.shape[1]
    zi = z / d
    if u.shape[1]:
        m = torch.diag(1 / lam) + (u / d[:, None]).T @ u
        lm = torch.linalg.cholesky(m)
        w = torch.cholesky_solve((zi @ u).T, lm).T
        quad = (z * zi).sum(1) - ((zi @ u) * w).sum(1)
        logdet = d.log().sum() + lam.log().sum() + 2 * torch.diagonal(lm).log().sum()
    else:
        quad, logdet = (z * zi).sum(1), d.log().sum()
    return float((-0.5 * (quad + logdet + p * math.log(2 * math.pi))).mean())


def select_rank(z: Tensor, candidates: tuple[int, ...] = (0, 2, 4, 8, 12, 16, 24, 32)) -> int:
    """EOF rank by held-out likelihood: EOFs and a diagonal residual fitted on the first
    75 % of the fit fields ``z`` ``(T, P)``, probabilistic-PCA log-likelihood (Tipping &
    Bishop 1999) of the last 25 %."""
    n_tr = max(2, int(0.75 * z.shape[0]))
    tr, va = z[:n_tr], z[n_tr:]
    if va.shape[0] == 0:
        return 0
    _, s, vh = torch.linalg.svd(tr, full_matrices=False)
    best, best_ll = 0, -math.inf
    for r in candidates:
        if r >= n_tr - 1:
            break
        u, lam = vh[:r].T, s[:r] ** 2 / n_tr
        resid = tr - tr @ u @ u.T
        d = (resid**2).sum(0) / max(n_tr - r, 1)
        ll = _ppca_val_loglik(u, lam, d.clamp_min(1e-6), va)
        if ll > best_ll:
            best, best_ll = r, ll
    return best
