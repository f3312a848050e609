"""The default imputation prior: per-season climatology plus a space-time Gaussian prior
of standardised anomalies (leading EOFs with AR(1) amplitudes and a Matérn residual),
fitted on a period of fields with missing entries (:func:`fit_field_prior`).

Used by :mod:`assim.impute` (posterior samples) and :mod:`assim.anomaly` (scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from assim import impute_holdout as ho
from assim.baselines import MaternOI, fit_matern_oi, grouped_climatology, matern
from assim.errors import InputError
from assim.impute_clim import harmonic_climatology
from assim.impute_hetero import _smoother, loo_lag_corr, residual_sd
from assim.impute_holdout import holdout_errors, holdout_variance_ratio
from assim.smoother import GaussianWindowPrior

__all__ = [
    "FieldPrior",
    "TorusMatern",
    "fit_field_prior",
    "fit_residual",
    "holdout_errors",
    "holdout_variance_ratio",
    "select_rank",
]


@dataclass
class FieldPrior:
    """Climatology + space-time Gaussian prior of standardised anomalies on ``P`` points.

    ``clim_mean`` ``(G, P)`` per season index, ``clim_std`` ``(P,)``; ``basis`` ``(P, r)``,
    ``lam``/``rho`` ``(r,)``; the residual is ``MaternOI(lat, lon, length, nugget, scale, nu)``,
    times ``diag(resid_sd) . diag(resid_sd)`` when per-point standard deviations
    ``resid_sd`` ``(P,)`` are given (non-stationary residual, :mod:`assim.impute_hetero`).
    ``spread_sd`` ``(P,)``, when given, multiplies the posterior deviations from the mean
    per point (:meth:`posterior`; fitted by held-out imputation, :func:`fit_field_prior`
    step 8), or with ``spread_share`` only the leave-one-out-like share of the posterior
    variance (:func:`~assim.impute_holdout.scale_local_share`).
    """

    lat: Tensor
    lon: Tensor
    clim_mean: Tensor
    clim_std: Tensor
    basis: Tensor
    lam: Tensor
    rho: Tensor
    length: float
    nugget: float
    scale: float
    nu: float = 1.5
    var_factor: float = 1.0
    spread: str = "fixed"
    geometry: str = "sphere"
    resid_rho: float = 0.0
    resid_sd: Tensor | None = None
    spread_sd: Tensor | None = None
    spread_share: str | None = None
    _window: GaussianWindowPrior | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key: str, fn):
        """``fn()`` computed once per prior (derived matrices: eigendecompositions, ...)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def n_groups(self) -> int:
        return self.clim_mean.shape[0]

    @property
    def residual(self) -> MaternOI:
        cls = TorusMatern if self.geometry == "torus" else MaternOI
        return cls(self.lat, self.lon, self.length, self.nugget, self.scale, self.nu)

    def posterior(
        self, z: Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Posterior samples ``(n, T, P)`` and mean ``(T, P)`` of standardised anomalies
        ``z`` ``(T, P)`` (NaN = missing) with the prior's spread model: ``spread`` is
        ``"fixed"`` (exact Gaussian posterior) or ``"window"`` (variance scale learnt
        from the window's observations,
        :meth:`~assim.smoother.GaussianWindowPrior.posterior_scaled`), deviations times
        ``sqrt(var_factor)`` (fitted on held-out fit-period fields) and, when given, by
        the per-point factors ``spread_sd`` ``(P,)`` (with ``spread_share``: on the local
        share of the variance only)."""
        if self.spread_share == "local" and self.spread_sd is not None:
            smp, mean, share = self.window.posterior_scaled(
                z, n, generator, self.spread, 1.0, self.var_factor, return_share=True
            )
            return ho.scale_local_share(smp, mean, share, self.spread_sd), mean
        if self.spread == "fixed" and self.var_factor == 1.0:
            smp, mean = self.window.posterior(z, n, generator)
        else:
            smp, mean = self.window.posterior_scaled(
                z, n, generator, self.spread, 1.0, self.var_factor
            )
        if self.spread_sd is not None and self.spread_share == "resid":
            share = ho.residual_share(self.window, z, max(n, 64), generator)
            smp = ho.scale_local_share(smp, mean, share, self.spread_sd)
        elif self.spread_sd is not None:  # per-point spread factor (the mean is unchanged)
            smp = mean + (smp - mean) * self.spread_sd.to(smp)
        return smp, mean

    def resid_cov(self) -> Tensor:
        """Residual covariance ``(P, P)``: the Matérn one, scaled by ``resid_sd`` on both
        sides when given."""
        cov = self.residual.cov()
        if self.resid_sd is not None:
            sd = self.resid_sd.to(cov)
            cov = sd[:, None] * cov * sd[None, :]
        return cov

    @property
    def window(self) -> GaussianWindowPrior:
        """The :class:`GaussianWindowPrior` (residual covariance built on first use)."""
        if self._window is None:
            self._window = GaussianWindowPrior(
                self.basis.double(),
                self.lam.double(),
                self.rho.double(),
                self.resid_cov(),
                float(self.resid_rho),
            )
        return self._window

    def standardize(self, values: Tensor, groups: Tensor) -> Tensor:
        """``(x - m_g) / s`` for ``values`` ``(T, P)``."""
        return (values.double() - self.clim_mean[groups.long()]) / self.clim_std

    def destandardize(self, z: Tensor, groups: Tensor) -> Tensor:
        return z * self.clim_std + self.clim_mean[groups.long()]

    def state_dict(self) -> dict:
        keys = ("lat", "lon", "clim_mean", "clim_std", "basis", "lam", "rho")
        out = {k: getattr(self, k).float() for k in keys}
        out.update(length=self.length, nugget=self.nugget, scale=self.scale, nu=self.nu)
        out.update(var_factor=self.var_factor, spread=self.spread, geometry=self.geometry)
        out["resid_rho"] = self.resid_rho
        if self.spread_share is not None:
            out["spread_share"] = self.spread_share
        for key in ("resid_sd", "spread_sd"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).float()
        out["kind"] = "gaussian_field_prior"
        return out

    @classmethod
    def from_state_dict(cls, sd: dict) -> FieldPrior:
        if sd.get("kind") != "gaussian_field_prior":
            raise InputError(f"not a Gaussian field prior checkpoint (kind={sd.get('kind')!r})")
        t = {k: sd[k].double() for k in ("lat", "lon", "clim_mean", "clim_std", "basis")}
        return cls(
            **t,
            lam=sd["lam"].double(),
            rho=sd["rho"].double(),
            length=sd["length"],
            nugget=sd["nugget"],
            scale=sd["scale"],
            nu=sd["nu"],
            var_factor=float(sd.get("var_factor", 1.0)),
            spread=str(sd.get("spread", "fixed")),
            geometry=str(sd.get("geometry", "sphere")),
            resid_rho=float(sd.get("resid_rho", 0.0)),
            resid_sd=sd["resid_sd"].double() if "resid_sd" in sd else None,
            spread_sd=sd["spread_sd"].double() if "spread_sd" in sd else None,
            spread_share=sd.get("spread_share"),
        )


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


def fit_field_prior(
    values: Tensor,
    groups: Tensor,
    lat: Tensor,
    lon: Tensor,
    n_groups: int | None = None,
    rank: int | None = None,
    generator: torch.Generator | None = None,
    calibrate: bool = True,
    spread: str = "local",
    geometry: str = "sphere",
    temporal_residual: bool | float | str | None = None,
    hetero: bool = False,
    seasonal: int | None = None,
    spread_hetero: bool | str = False,
) -> FieldPrior:
    """Fit the default prior on fit-period fields ``values`` ``(T, P)`` (NaN allowed).

    1. climatology per season index and pooled anomaly std (``grouped_climatology``;
       with ``seasonal = H`` and several season groups, an ``H``-harmonic annual cycle,
       :func:`~assim.impute_clim.harmonic_climatology`, fewer coefficients for short
       records);
    2. EOFs of the standardised anomalies (rank by :func:`select_rank` unless given),
       eigenvalues ``lam_i = s_i^2 / T`` and AR(1) coefficients = lag-1 autocorrelation of
       the principal components (clamped to ``[0, 0.98]``);
    3. Matérn residual by leave-one-out CV (:func:`fit_residual`; ``geometry`` "sphere":
       lat/lon in degrees, "torus": y/x in radians on the periodic square), its
       variance inflated by the ratio of held-out to in-sample residual variance (the
       in-sample residual of sample EOFs is too small);
    4. (``calibrate``) one global variance factor from held-out imputation
       (:func:`holdout_variance_ratio`) multiplies the prior covariance;
    5. ``spread``, the posterior spread model (:meth:`FieldPrior.posterior`,
       :meth:`~assim.smoother.GaussianWindowPrior.posterior_scaled`): ``"local"``
       (default) scales the leave-one-out-like share of each missing value's variance by
       the size of the innovations observed around it in the same window, the rest
       keeps the calibrated prior's spread of step 4 (inflated when the window's
       anomalies are larger than the fit period's); it is self-calibrating, so
       ``var_factor`` stays 1. With ``"window"`` one scale per window is learnt and
       (``calibrate``) ``var_factor`` is fitted by held-out imputation with that model.
       ``"fixed"``: the step-4 prior as is (the behaviour before spread models existed).
    6. ``temporal_residual``: an AR(1) residual in time, ``e_k = rho_e e_{k-1} +
       sqrt(1 - rho_e^2) xi_k`` (the posterior is then solved through the residual's
       precision, :mod:`assim.smoother_ar1`). ``None`` (auto) = ``"holdout"``: ``rho_e``
       chosen among 0, 0.2, ..., 0.8 by the squared error of held-out imputation of the
       last 25 % of the fit fields (:func:`~assim.impute_holdout.select_resid_rho`; white
       when fewer than 2 fields are held out). The in-sample lag-1 correlation of the EOF
       residual is not used: sample EOFs absorb part of the residual of few fields, which
       biases it low (-0.56 in-sample against +0.56 held out on ``ostia_sst``). A number
       sets ``rho_e`` itself, ``False`` keeps the residual white; ``"loo"`` takes the
       lag-1 correlation of the residual's leave-one-out residuals
       (:func:`~assim.impute_hetero.loo_lag_corr`: the persistence of what the
       neighbours at the same step cannot explain).
    7. ``hetero``: per-point residual standard deviations ``s`` (residual covariance
       ``scale diag(s) C diag(s)``, ``C`` the step-3 Matérn correlation;
       :func:`~assim.impute_hetero.residual_sd`): the smoothed per-point leave-one-out
       variance ratio under ``C``, bandwidth (1/6, 1/3, 2/3 or 4/3 of the Matérn
       length) or the stationary residual chosen by held-out LOO log density (first
       75 % / last 25 % of the fit fields), then ``scale`` by LOO on all fit fields
       (before step 3's inflation). ``False`` keeps the stationary residual.
    8. ``spread_hetero`` (with ``calibrate``): a per-point spread factor
       (``FieldPrior.spread_sd``) from the held-out imputation of step 4 with the final
       spread model (:func:`holdout_errors`): ``sqrt(W err2 / W var)`` with ``W`` the
       residual's Matérn 3/2 kernel at its own length (a local average of the
       calibration ratio), clamped to ``[0.5, 2]``; the mean is unchanged. ``"local"``:
       the factor scales only the leave-one-out-like share of the posterior variance
       (``spread_share``; fitted by :func:`~assim.impute_holdout.fit_spread_sd` on it),
       so the inside of a large gap keeps the calibrated prior's spread; ``"resid"``:
       only the share due to the residual given the EOF amplitudes
       (:func:`~assim.impute_holdout.residual_share`), so only the EOF part is kept.
       All calibration uses the fit fields only, never the fields being imputed.
    """
    if spread not in ("fixed", "window", "local"):
        raise InputError(f"spread must be 'fixed', 'window' or 'local', got {spread!r}")
    if spread_hetero not in (False, True, "local", "resid"):
        raise InputError(f"spread_hetero must be a bool, 'local' or 'resid', not {spread_hetero!r}")
    values = values.double()
    if seasonal is not None and (n_groups or int(groups.max()) + 1) > 1:
        mean, std = harmonic_climatology(values, groups, n_groups or 12, int(seasonal))
    else:
        mean, std = grouped_climatology(values, groups, n_groups)
    z = ((values - mean[groups.long()]) / std).nan_to_num(0.0)
    t = z.shape[0]
    if t < 4:
        raise InputError(f"need at least 4 fit fields to fit a prior, got {t}")
    r = select_rank(z) if rank is None else int(rank)
    r = min(r, t - 2)
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    u, lam = vh[:r].T.contiguous(), (s[:r] ** 2 / t).clamp_min(1e-8)
    pcs = z @ u
    if r:
        a, b = pcs[:-1], pcs[1:]
        rho = ((a * b).sum(0) / (a * a).sum(0).clamp_min(1e-12)).clamp(0.0, 0.98)
    else:
        rho = torch.zeros(0, dtype=z.dtype)
    resid = z - pcs @ u.T
    ra, rb = resid[:-1], resid[1:]
    rho_e = float(((ra * rb).sum() / (ra * ra).sum().clamp_min(1e-12)).clamp(0.0, 0.98))
    if temporal_residual is None:  # auto: held-out choice (white with too few fields)
        temporal_residual = "holdout" if t - max(2, int(0.75 * t)) >= 2 else False
    if temporal_residual == "loo":
        rho_e, temporal_residual = -1.0, True  # set below, once the residual kernel is known
    elif temporal_residual == "holdout":
        rho_e, temporal_residual = -2.0, False  # chosen below by held-out imputation
    elif not isinstance(temporal_residual, bool):
        try:
            rho_e = float(temporal_residual)
        except (TypeError, ValueError):
            rho_e = -3.0
        if not 0.0 <= rho_e < 1.0:
            raise InputError(
                "temporal_residual must be None, a bool, a number in [0, 1), 'loo' or "
                f"'holdout', got {temporal_residual!r}"
            )
        temporal_residual = rho_e > 0
    oi = fit_residual(resid, lat, lon, geometry, generator)
    base_scale, sd = oi.scale, None
    if hetero:  # bandwidths: fractions of the residual's length scale
        fracs = (1 / 6, 1 / 3, 2 / 3, 4 / 3)
        smoothers = [lambda b=f * oi.length: _smoother(oi, b) for f in fracs]
        sd, base_scale, _ = residual_sd(resid, oi.cov() / oi.scale, smoothers, int(0.75 * t))
    if rho_e == -1.0:  # "loo": lag-1 correlation of the residual's LOO residuals
        rho_e = loo_lag_corr(resid, oi.cov() / oi.scale, sd)
    # held-out inflation of the residual variance
    n_tr = max(2, int(0.75 * t))
    if r and t - n_tr >= 1:
        _, _, vh_tr = torch.linalg.svd(z[:n_tr], full_matrices=False)
        u_tr = vh_tr[:r].T
        in_var = ((z[:n_tr] - z[:n_tr] @ u_tr @ u_tr.T) ** 2).mean()
        out_var = ((z[n_tr:] - z[n_tr:] @ u_tr @ u_tr.T) ** 2).mean()
        infl = float((out_var / in_var).clamp(1.0, 3.0))
    else:
        infl = 1.0
    prior = FieldPrior(
        lat.double(),
        lon.double(),
        mean,
        std,
        u,
        lam,
        rho,
        oi.length,
        oi.nugget,
        base_scale * infl,
        oi.nu,
        geometry=geometry,
        resid_rho=rho_e if temporal_residual else 0.0,
        resid_sd=sd,
    )
    if rho_e == -2.0 and t - n_tr >= 2:  # "holdout"
        prior.resid_rho = ho.select_resid_rho(prior, z, n_tr, generator)[0]
        prior._window = None  # built above with the white residual
    if calibrate and t - n_tr >= 1:
        c = holdout_variance_ratio(prior, z, n_tr, generator)
        prior.lam, prior.scale, prior._window = prior.lam * c, prior.scale * c, None
        prior._cache.clear()
        if spread == "window":
            prior.var_factor = holdout_variance_ratio(prior, z, n_tr, generator, spread)
    prior.spread = spread
    if spread_hetero and calibrate and t - n_tr >= 1:
        share = spread_hetero if isinstance(spread_hetero, str) else None
        sums = holdout_errors(prior, z, n_tr, generator, spread, share)
        prior.spread_sd = ho.fit_spread_sd(_smoother(oi, oi.length), *sums)
        prior.spread_share = share
    return prior
