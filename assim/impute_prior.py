"""The default imputation prior: per-season climatology plus a space-time Gaussian prior
of standardised anomalies (leading EOFs with AR(1) amplitudes and a Matérn residual),
fitted on a period of fields with missing entries (:func:`fit_field_prior`).

Used by :mod:`assim.impute` (posterior samples) and :mod:`assim.anomaly` (scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from assim import impute_holdout as ho
from assim.baselines import MaternOI, grouped_climatology
from assim.errors import InputError
from assim.impute_clim import harmonic_climatology
from assim.impute_fit import TorusMatern, fit_residual, select_rank
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
    std_power: float | str = 1.0,
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
       sets ``rho_e`` itself, ``False`` keeps the residual white, ``True`` takes that
       in-sample lag-1 correlation (clamped to [0, 0.98]); ``"loo"`` takes the
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

    ``std_power`` ``p``: the anomalies are divided by ``s^p mean(s)^(1 - p)`` instead of
    the per-point anomaly standard deviation ``s`` (``p = 1``, the default): ``p = 0``
    models them in physical units (one common scale), ``p = 0.5`` half way. Where the
    variance changes sharply between neighbours (coasts, fronts), full standardisation
    makes the field rougher than it is and the stationary kernel weights neighbours
    poorly. ``"holdout"``: ``p`` in 1, 0.5, 0 with the lowest CRPS of held-out imputation
    of the last 25 % of the fit fields (:func:`~assim.impute_select.select_std_power`,
    three extra fits).
    """
    if spread not in ("fixed", "window", "local"):
        raise InputError(f"spread must be 'fixed', 'window' or 'local', got {spread!r}")
    if std_power == "holdout":
        from assim.impute_select import select_std_power

        std_power = select_std_power(
            values, groups, lat, lon, n_groups, generator=generator, rank=rank,
            calibrate=calibrate, spread=spread, geometry=geometry,
            temporal_residual=temporal_residual, hetero=hetero, seasonal=seasonal,
            spread_hetero=spread_hetero,
        )[0]  # fmt: skip
    if not isinstance(std_power, (int, float)) or not 0.0 <= float(std_power) <= 1.0:
        raise InputError(f"std_power must be in [0, 1] or 'holdout', got {std_power!r}")
    if spread_hetero not in (False, True, "local", "resid"):
        raise InputError(f"spread_hetero must be a bool, 'local' or 'resid', not {spread_hetero!r}")
    values = values.double()
    if seasonal is not None and (n_groups or int(groups.max()) + 1) > 1:
        mean, std = harmonic_climatology(values, groups, n_groups or 12, int(seasonal))
    else:
        mean, std = grouped_climatology(values, groups, n_groups)
    if std_power != 1.0:  # partial standardisation: s^p times the mean s^(1 - p)
        std = std ** float(std_power) * std.mean() ** (1.0 - float(std_power))
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
    choose = None  # "loo" / "holdout": rho_e is chosen below, once the residual is fitted
    if temporal_residual in ("loo", "holdout"):
        choose, temporal_residual = temporal_residual, temporal_residual == "loo"
    elif not isinstance(temporal_residual, bool):
        try:
            rho_e = float(temporal_residual)
        except (TypeError, ValueError):
            rho_e = float("nan")
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
    if choose == "loo":  # lag-1 correlation of the residual's LOO residuals
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
    if choose == "holdout" and t - n_tr >= 2:
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
