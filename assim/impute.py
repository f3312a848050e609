"""Imputation: samples of the missing entries of gridded fields given everything observed.

Three methods share one interface ``samples (K, T, P)`` over the ``P`` valid grid points:

- :class:`FieldPrior` (default, ``--prior gaussian``): standardised anomalies relative
  to a per-calendar-month climatology, ``z = (x - m_month) / s``, with the space-time
  Gaussian prior of :class:`assim.smoother.GaussianWindowPrior` (leading EOFs with AR(1)
  amplitudes plus a Matérn residual chosen by cross-validation). Its posterior is
  sampled *exactly* (Matheron's rule), so a window's space-time structure is used
  (smoothing over the window, :mod:`assim.smoother`). A Gaussian prior is a diffusion
  prior whose denoiser is closed-form (``GaussianDenoiser``): guided diffusion sampling
  converges to the same posterior, which this path computes directly.
- the same prior as a *diffusion* prior (``method="twisted"``): a DDPM chain whose
  denoiser is the prior's exact one (``GaussianDenoiser``), conditioned by twisted SMC
  (:func:`assim.smoother.twisted_inpaint`: twisted Gaussian proposals, exact importance
  weights, adaptive resampling). It converges to the posterior of the chain, i.e. to the
  exact posterior up to the chain's discretisation; it is the path a learned denoiser
  (any ``forward(x_t, t, cond)`` with a schedule) takes too. ``method="replacement"``
  (:func:`assim.smoother.guided_inpaint`) is the biased replacement inpainting, kept for
  comparison.

Observed entries are copied from the input bit for bit. :func:`impute` wraps the
arrays into an ``xarray.Dataset`` with ``member``, mean and interval bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from assim.baselines import MaternOI, fit_matern_oi, grouped_climatology
from assim.errors import InputError
from assim.rng import rand
from assim.smoother import GaussianWindowPrior
from assim.twisted import gaussian_diffusion_sampler, impute_window

__all__ = [
    "METHODS",
    "FieldPrior",
    "check_grid",
    "field_points",
    "fit_field_prior",
    "gaussian_diffusion_sampler",
    "impute",
    "impute_array",
    "season_index",
]


@dataclass
class FieldPrior:
    """Climatology + space-time Gaussian prior of standardised anomalies on ``P`` points.

    ``clim_mean`` ``(G, P)`` per season index, ``clim_std`` ``(P,)``; ``basis`` ``(P, r)``,
    ``lam``/``rho`` ``(r,)``; the residual is ``MaternOI(lat, lon, length, nugget, scale, nu)``.
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
        return MaternOI(self.lat, self.lon, self.length, self.nugget, self.scale, self.nu)

    @property
    def window(self) -> GaussianWindowPrior:
        """The :class:`GaussianWindowPrior` (residual covariance built on first use)."""
        if self._window is None:
            self._window = GaussianWindowPrior(
                self.basis.double(), self.lam.double(), self.rho.double(), self.residual.cov()
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
        )


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
) -> FieldPrior:
    """Fit the default prior on fit-period fields ``values`` ``(T, P)`` (NaN allowed).

    1. climatology per season index and pooled anomaly std (``grouped_climatology``);
    2. EOFs of the standardised anomalies (rank by :func:`select_rank` unless given),
       eigenvalues ``lam_i = s_i^2 / T`` and AR(1) coefficients = lag-1 autocorrelation of
       the principal components (clamped to ``[0, 0.98]``);
    3. Matérn residual by leave-one-out CV (:func:`assim.baselines.fit_matern_oi`), its
       variance inflated by the ratio of held-out to in-sample residual variance (the
       in-sample residual of sample EOFs is too small);
    4. (``calibrate``) one global variance factor from held-out imputation
       (:func:`holdout_variance_ratio`).
    """
    values = values.double()
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
    oi = fit_matern_oi(resid, lat, lon, generator=generator)
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
        oi.scale * infl,
        oi.nu,
    )
    if calibrate and t - n_tr >= 1:
        c = holdout_variance_ratio(prior, z, n_tr, generator)
        prior.lam, prior.scale, prior._window = prior.lam * c, prior.scale * c, None
        prior._cache.clear()
    return prior


def holdout_variance_ratio(
    prior: FieldPrior, z: Tensor, n_tr: int, generator: torch.Generator | None = None
) -> float:
    """Global variance factor ``c = mean(err^2) / mean(posterior var)`` of imputing 30 %
    of the points at random and a contiguous band of a sixth of them in the held-out
    fields ``z[n_tr:]`` with EOFs refitted on ``z[:n_tr]``
    (same residual). Scaling the whole prior covariance by ``c`` leaves the posterior
    mean of exactly observed data unchanged and calibrates its spread; clamped to
    ``[0.5, 4]``."""
    r = prior.basis.shape[1]
    _, s, vh = torch.linalg.svd(z[:n_tr], full_matrices=False)
    sub = GaussianWindowPrior(
        vh[:r].T.contiguous(),
        (s[:r] ** 2 / n_tr).clamp_min(1e-8),
        prior.rho,
        prior.window.resid_cov,
    )
    val = z[n_tr:].clone()
    hid = rand(val.shape, generator, device=val.device, dtype=val.dtype) < 0.3
    p = val.shape[1]  # plus a contiguous run of a sixth of the points (a band of rows)
    j0 = int(torch.randint(0, max(1, p - p // 6), (1,), generator=generator))
    hid[:, j0 : j0 + p // 6] = True
    masked = val.masked_fill(hid, float("nan"))
    smp, mean = sub.posterior(masked, 32, generator)
    err2 = ((mean - val)[hid] ** 2).mean()
    var = smp.var(0)[hid].mean()
    return float((err2 / var).clamp(0.5, 4.0))


METHODS = ("exact", "twisted", "replacement")
_METHOD_DOC = {
    "exact": "exact Gaussian posterior (Matheron's rule)",
    "twisted": "twisted SMC through a DDPM chain of the Gaussian prior's exact denoiser",
    "replacement": "replacement inpainting through a DDPM chain (biased)",
}


def impute_array(
    prior: FieldPrior,
    values: Tensor,
    groups: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    window: int = 12,
    method: str = "exact",
    steps: int = 64,
    particles: int | None = None,
    obs_std: float = 1e-2,
) -> tuple[Tensor, Tensor]:
    """Posterior samples ``(n, T, P)`` and mean ``(T, P)`` of fields ``values`` ``(T, P)``
    whose NaN entries are missing, in chunks of ``window`` steps (each chunk conditioned
    on all of its observations, past and future). Observed entries are the input's,
    bit for bit, in the input's dtype.

    ``method``: ``"exact"`` (Matheron's rule on the Gaussian prior: exact draws),
    ``"twisted"`` (twisted SMC through a ``steps``-step DDPM chain whose denoiser is the
    prior's exact one, :func:`gaussian_diffusion_sampler`; ``particles`` (default
    ``max(n, 64)``) weighted particles, observations as ``N(y; x_O, obs_std^2)`` in
    standardised units; converges to the exact posterior of the chain) or
    ``"replacement"`` (replacement inpainting through the same chain: biased, for
    comparison). The diffusion methods form the window's dense covariance ``(TP, TP)``:
    keep ``window * P`` to a few thousand.
    """
    if method not in METHODS:
        raise InputError(f"unknown imputation method {method!r}; expected one of {list(METHODS)}")
    if values.ndim != 2 or values.shape[1] != prior.lat.numel():
        raise InputError(
            f"fields have shape {tuple(values.shape)}, the prior expects (T, {prior.lat.numel()})"
        )
    if not bool(torch.isfinite(values).any()):
        raise InputError("nothing is observed: every value is NaN")
    if particles is None:
        particles = max(n, 64)
    z = prior.standardize(values, groups)
    out = torch.empty((n, *values.shape), dtype=torch.float64)
    mean = torch.empty(values.shape, dtype=torch.float64)
    for k0 in range(0, values.shape[0], window):
        sl = slice(k0, k0 + window)
        if method == "exact":
            smp, mu = prior.window.posterior(z[sl], n, generator)
        else:
            smp, mu = impute_window(prior, z[sl], n, method, generator, steps, particles, obs_std)
        out[:, sl] = prior.destandardize(smp, groups[sl])
        mean[sl] = prior.destandardize(mu, groups[sl])
    obs = torch.isfinite(values)
    out, mean = out.to(values.dtype), mean.to(values.dtype)
    out[:, obs] = values[obs]
    mean[obs] = values[obs]
    return out, mean


# --------------------------------------------------------------------------- xarray edge
def check_grid(prior: FieldPrior, lat: np.ndarray, lon: np.ndarray, name: str) -> None:
    """Raise :class:`InputError` unless the prior lives on these valid points."""
    same = prior.lat.numel() == lat.size and (
        np.allclose(prior.lat.numpy(), lat, atol=1e-4)
        and np.allclose(prior.lon.numpy(), lon, atol=1e-4)
    )
    if not same:
        raise InputError(
            f"the prior has {prior.lat.numel()} grid points, variable {name!r} has {lat.size}"
            " valid points on another grid"
        )


def season_index(time) -> tuple[np.ndarray, int]:
    """Calendar-month index ``0..11`` when ``time`` (an xarray coordinate) is monthly,
    else a single group: returns ``(groups (T,), n_groups)``."""
    try:
        months = np.asarray(time.dt.month) - 1
        step = np.median(np.diff(np.asarray(time.dt.dayofyear))) if time.size > 1 else 0
        days = np.abs(step)
    except (AttributeError, TypeError):
        return np.zeros(time.size, dtype=np.int64), 1
    if time.size > 12 and (25 <= days <= 35 or len(np.unique(months)) == 12):
        return months.astype(np.int64), 12
    return np.zeros(time.size, dtype=np.int64), 1


def field_points(da, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid grid points of a ``(time, lat, lon)`` DataArray: returns ``valid`` (lat, lon)
    boolean, and the latitudes/longitudes ``(P,)`` of the valid points in C order.

    ``mask`` (lat, lon), 1/True = valid (sea), if given; otherwise a point is valid when
    it is observed at least once."""
    if da.ndim != 3:
        raise InputError(f"variable {da.name!r} must be (time, lat, lon), got dims {da.dims}")
    lat_name, lon_name = da.dims[1], da.dims[2]
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != da.shape[1:]:
            raise InputError(
                f"mask has shape {m.shape} but variable {da.name!r} has grid {da.shape[1:]}"
            )
        valid = m.astype(bool)
    else:
        valid = np.isfinite(np.asarray(da)).any(0)
    if not valid.any():
        raise InputError(f"variable {da.name!r} is NaN everywhere: nothing to condition on")
    lat2, lon2 = np.meshgrid(da[lat_name].values, da[lon_name].values, indexing="ij")
    return valid, lat2[valid].astype(float), lon2[valid].astype(float)


def impute(
    da,
    prior: FieldPrior | None = None,
    n: int = 32,
    level: float = 0.9,
    generator: torch.Generator | None = None,
    mask=None,
    window: int = 12,
    method: str = "exact",
    steps: int = 64,
    particles: int | None = None,
):
    """Impute the NaN entries of ``da`` (time, lat, lon); returns an ``xarray.Dataset``
    with ``<name>`` (member, time, lat, lon), ``<name>_mean``, ``<name>_lower`` /
    ``<name>_upper`` (central ``level`` interval from the samples) and ``imputed`` (1
    where a value was filled). ``prior=None`` fits :func:`fit_field_prior` on ``da``
    itself (all its fields, missing entries ignored). ``method``/``steps``/``particles``:
    see :func:`impute_array`."""
    import xarray as xr

    valid, lat, lon = field_points(da, mask)
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    vals = torch.from_numpy(np.asarray(da.values)[:, valid].astype(np.float64))
    groups_np, n_groups = season_index(da[da.dims[0]])
    groups = torch.from_numpy(groups_np)
    if not bool(torch.isfinite(vals).any()):
        raise InputError(f"variable {da.name!r} is NaN everywhere: nothing to condition on")
    if prior is None:
        prior = fit_field_prior(
            vals,
            groups,
            torch.from_numpy(lat),
            torch.from_numpy(lon),
            n_groups,
            generator=generator,
        )
    else:
        check_grid(prior, lat, lon, str(da.name))
    groups = groups % prior.n_groups
    smp, mean = impute_array(prior, vals, groups, n, generator, window, method, steps, particles)
    q = torch.quantile(smp, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=smp.dtype), 0)

    def grid(a: Tensor) -> np.ndarray:
        out = np.full((*a.shape[:-1], *valid.shape), np.nan, dtype=np.asarray(da.values).dtype)
        out[..., valid] = a.numpy()
        return out

    dims = tuple(da.dims)
    name = da.name or "field"
    samples = grid(smp)
    raw = np.asarray(da.values)
    member = xr.DataArray(
        np.arange(n), dims="member", attrs={"standard_name": "realization", "long_name": "sample"}
    )
    ds = xr.Dataset(
        {
            name: (("member", *dims), samples, dict(da.attrs)),
            f"{name}_mean": (dims, grid(mean), {**da.attrs, "long_name": "posterior mean"}),
            f"{name}_lower": (dims, grid(q[0]), {"long_name": f"{level:.0%} interval lower"}),
            f"{name}_upper": (dims, grid(q[1]), {"long_name": f"{level:.0%} interval upper"}),
            "imputed": (
                dims,
                (~np.isfinite(raw) & valid[None]).astype(np.int8),
                {"long_name": "1 where the value was imputed"},
            ),
        },
        coords={**{d: da[d] for d in dims}, "member": member},
        attrs={
            "Conventions": "CF-1.8",
            "title": f"imputation of {name}",
            "prior": "gaussian (EOF + Matern)",
            "method": _METHOD_DOC[method],
            "level": level,
        },
    )
    return ds
