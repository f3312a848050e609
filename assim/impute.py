"""Imputation: samples of the missing entries of gridded fields given everything observed.

Three methods share one interface ``samples (K, T, P)`` over the ``P`` valid grid points:

- :class:`FieldPrior` (default, ``--prior gaussian``; fitted in :mod:`assim.impute_prior`
  and re-exported here): standardised anomalies relative
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

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from assim.errors import InputError
from assim.impute_prior import FieldPrior, fit_field_prior
from assim.twisted import gaussian_diffusion_sampler, impute_window

__all__ = [
    "METHODS",
    "FieldData",
    "FieldPrior",
    "check_grid",
    "field_data",
    "field_points",
    "fit_field_prior",
    "gaussian_diffusion_sampler",
    "grid_geometry",
    "impute",
    "impute_array",
    "prior_for",
    "season_index",
]


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
            smp, mu = prior.posterior(z[sl], n, generator)
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


def grid_geometry(da) -> str:
    """``"torus"`` for a field on the periodic square of :mod:`models.physics.kolmogorov`
    (dims ``(time, y, x)`` with coordinates in ``[0, 2 pi)``), else ``"sphere"`` (lat/lon
    in degrees)."""
    if tuple(da.dims[1:]) == ("y", "x"):
        c = np.concatenate([np.asarray(da["y"].values), np.asarray(da["x"].values)])
        if c.min() >= 0 and c.max() < 2 * np.pi:
            return "torus"
    return "sphere"


@dataclass(frozen=True)
class FieldData:
    """A ``(time, lat, lon)`` field on its ``P`` valid points: ``valid`` (lat, lon) mask,
    ``lat``/``lon`` ``(P,)``, ``values`` ``(T, P)`` float64 (NaN = missing), season
    ``groups`` ``(T,)`` and ``n_groups`` (:func:`season_index`)."""

    valid: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    values: Tensor
    groups: Tensor
    n_groups: int
    geometry: str = "sphere"


def field_data(da, mask=None) -> FieldData:
    """:class:`FieldData` of ``da`` (see :func:`field_points` for ``mask``)."""
    valid, lat, lon = field_points(da, mask)
    values = torch.from_numpy(np.asarray(da.values)[:, valid].astype(np.float64))
    groups, n_groups = season_index(da[da.dims[0]])
    geo = grid_geometry(da)
    return FieldData(valid, lat, lon, values, torch.from_numpy(groups), n_groups, geo)


def prior_for(
    data: FieldData,
    prior: FieldPrior | None,
    name: str,
    generator: torch.Generator | None = None,
    **fit_kwargs,
) -> FieldPrior:
    """``prior`` checked against the field's grid (:func:`check_grid`), or, when it is
    ``None``, :func:`fit_field_prior` on the field itself (missing entries ignored; extra
    ``fit_kwargs`` such as ``std_power`` are passed on)."""
    if prior is not None:
        check_grid(prior, data.lat, data.lon, name)
        return prior
    return fit_field_prior(
        data.values,
        data.groups,
        torch.from_numpy(data.lat),
        torch.from_numpy(data.lon),
        data.n_groups,
        generator=generator,
        geometry=data.geometry,
        **fit_kwargs,
    )


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
    data = field_data(da, mask)
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    valid, vals = data.valid, data.values
    if not bool(torch.isfinite(vals).any()):
        raise InputError(f"variable {da.name!r} is NaN everywhere: nothing to condition on")
    prior = prior_for(data, prior, str(da.name), generator)
    groups = data.groups % prior.n_groups
    smp, mean = impute_array(prior, vals, groups, n, generator, window, method, steps, particles)
    attrs = {"prior": "gaussian (EOF + Matern)", "method": _METHOD_DOC[method]}
    return imputation_dataset(da, valid, smp, mean, level, attrs)


def imputation_dataset(da, valid: np.ndarray, smp: Tensor, mean: Tensor, level: float, attrs: dict):
    """The CF Dataset of an imputation of ``da`` (see :func:`impute`) from samples
    ``(K, T, P)`` and mean ``(T, P)`` over the ``P`` points where ``valid`` is true."""
    import xarray as xr

    n = smp.shape[0]
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
            **attrs,
            "level": level,
        },
    )
    return ds
