"""Classical baselines for imputation and anomaly detection on gridded fields.

Fields are flattened over their valid (non-land) grid points: a time series of
fields is ``(T, P)`` with coordinates ``lat, lon`` of shape ``(P,)`` in degrees.

- :func:`grouped_climatology`: mean per calendar month (or any season index) and a
  pooled anomaly standard deviation per point.
- :func:`linear_interp`: piecewise-linear interpolation in (lon, lat) by Delaunay
  triangulation (:func:`scipy.interpolate.griddata`), nearest value outside the hull,
  longitudes wrapped when the grid is global.
- :class:`MaternOI`: optimal interpolation / simple kriging (Gandin 1963; Rasmussen &
  Williams 2006, ch. 2) of standardised anomalies with a Matérn covariance on chordal
  distance (positive definite on the sphere for every smoothness), length scale and
  nugget chosen by leave-one-out cross-validation (R&W §5.4.2) on the fit period.
- :func:`zscore` and :func:`oi_loo_residual`: anomaly baselines (standardised anomaly
  against climatology; leave-one-out spatial OI residual, an innovation statistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

EARTH_RADIUS_KM = 6371.0


def unit_vectors(lat: Tensor, lon: Tensor) -> Tensor:
    """Points on the unit sphere ``(P, 3)`` from latitudes/longitudes in degrees."""
    phi, lam = torch.deg2rad(lat.double()), torch.deg2rad(lon.double())
    return torch.stack([phi.cos() * lam.cos(), phi.cos() * lam.sin(), phi.sin()], -1)


def chordal_distance(lat: Tensor, lon: Tensor, lat2: Tensor | None = None, lon2=None) -> Tensor:
    """Chordal (straight-line) distance in km between two point sets, ``(P, P2)``."""
    a = unit_vectors(lat, lon)
    b = a if lat2 is None else unit_vectors(lat2, lon2)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") * EARTH_RADIUS_KM


def matern(d: Tensor, length: float, nu: float = 1.5) -> Tensor:
    """Matérn correlation for ``nu`` in {0.5, 1.5, 2.5} at distance ``d`` (same units)."""
    r = d / length
    if nu == 0.5:
        return torch.exp(-r)
    if nu == 1.5:
        s = math.sqrt(3.0) * r
        return (1 + s) * torch.exp(-s)
    if nu == 2.5:
        s = math.sqrt(5.0) * r
        return (1 + s + s**2 / 3) * torch.exp(-s)
    raise ValueError(f"matern: nu must be 0.5, 1.5 or 2.5, got {nu}")


def grouped_climatology(
    values: Tensor, groups: Tensor, n_groups: int | None = None
) -> tuple[Tensor, Tensor]:
    """Climatology of ``values`` ``(T, P)`` (NaN = missing) per season index ``groups``.

    Returns ``mean`` ``(G, P)`` (the overall mean where a group has no data) and the
    pooled standard deviation of the anomalies ``std`` ``(P,)`` (floored at 1e-6).
    """
    g = groups.long()
    n_groups = int(g.max()) + 1 if n_groups is None else n_groups
    overall = torch.nanmean(values, 0)
    mean = overall.expand(n_groups, -1).clone()
    for k in range(n_groups):
        sel = values[g == k]
        if sel.shape[0]:
            m = torch.nanmean(sel, 0)
            mean[k] = torch.where(torch.isnan(m), overall, m)
    anom = values - mean[g]
    std = torch.sqrt(torch.nanmean(anom**2, 0)).nan_to_num(1.0).clamp_min(1e-6)
    return mean, std


def linear_interp(values: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Fill NaN entries of one field ``(P,)`` by linear interpolation in (lon, lat).

    Longitudes are wrapped (copies of 30° strips at ±360°) when the grid spans the
    globe, so the dateline is not a boundary. Points outside the convex hull take the nearest value.
    """
    from scipy.interpolate import griddata

    values, lat, lon = np.asarray(values, float), np.asarray(lat, float), np.asarray(lon, float)
    obs = np.isfinite(values)
    if obs.all():
        return values.copy()
    if obs.sum() < 3:
        raise ValueError("linear_interp: need at least 3 observed points")
    pts, val = np.c_[lon[obs], lat[obs]], values[obs]
    if np.ptp(lon) > 300:  # global in longitude: wrap copies of a 30-degree strip
        lo, hi = pts[:, 0] < lon.min() + 30, pts[:, 0] > lon.max() - 30
        pts = np.r_[pts, pts[lo] + [360.0, 0.0], pts[hi] - [360.0, 0.0]]
        val = np.r_[val, val[lo], val[hi]]
    target = np.c_[lon[~obs], lat[~obs]]
    out = values.copy()
    lin = griddata(pts, val, target, method="linear")
    bad = ~np.isfinite(lin)
    if bad.any():
        lin[bad] = griddata(pts, val, target[bad], method="nearest")
    out[~obs] = lin
    return out


@dataclass
class MaternOI:
    """Simple kriging of standardised anomalies ``z`` (zero mean) with covariance
    ``scale * ((1 - nugget) * Matern(d / length) + nugget * I)`` on points ``lat, lon``."""

    lat: Tensor
    lon: Tensor
    length: float
    nugget: float
    scale: float = 1.0
    nu: float = 1.5

    def cov(self, idx_a: Tensor | None = None, idx_b: Tensor | None = None) -> Tensor:
        """Covariance block between point subsets (indices into ``lat``), float64."""
        full = torch.arange(self.lat.numel(), device=self.lat.device)
        ia = full if idx_a is None else idx_a
        ib = full if idx_b is None else idx_b
        d = chordal_distance(self.lat[ia], self.lon[ia], self.lat[ib], self.lon[ib])
        c = (1 - self.nugget) * matern(d, self.length, self.nu)
        c = c + self.nugget * (ia[:, None] == ib[None, :]).double()  # nugget: same point
        return self.scale * c

    def predict(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Kriging mean and variance ``(P,)`` of a field with NaN at the unknown points.

        ``mean_m = C_mo C_oo^{-1} z_o``, ``var_m = c_mm - diag(C_mo C_oo^{-1} C_om)``;
        observed points are returned unchanged with zero variance.
        """
        z = z.double()
        obs = torch.isfinite(z)
        io, im = obs.nonzero().squeeze(1), (~obs).nonzero().squeeze(1)
        chol = torch.linalg.cholesky(self.cov(io, io))
        c_mo = self.cov(im, io)
        a = torch.cholesky_solve(z[io, None], chol)
        w = torch.linalg.solve_triangular(chol, c_mo.T, upper=False)
        mean, var = z.clone(), torch.zeros_like(z)
        mean[im] = (c_mo @ a).squeeze(1)
        var[im] = (self.scale - (w**2).sum(0)).clamp_min(1e-12)
        return mean, var

    def loo(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Leave-one-out residuals ``z_i - E[z_i | z_-i]`` and their variances for fully
        observed fields ``(T, P)`` via the precision ``Q``: ``r_i = (Q z)_i / Q_ii``,
        ``var_i = 1 / Q_ii`` (Rasmussen & Williams eq. 5.12)."""
        q = torch.cholesky_inverse(torch.linalg.cholesky(self.cov()))
        qd = torch.diagonal(q)
        return (z.double() @ q) / qd, (1.0 / qd).expand(z.shape[0], -1)


def fit_matern_oi(
    z: Tensor,
    lat: Tensor,
    lon: Tensor,
    lengths: tuple[float, ...] = (150.0, 300.0, 600.0, 1200.0, 2400.0),
    nuggets: tuple[float, ...] = (0.002, 0.01, 0.05, 0.2),
    nu: float = 1.5,
    max_points: int = 2000,
    generator: torch.Generator | None = None,
) -> MaternOI:
    """Choose ``length`` (km) and ``nugget`` by leave-one-out log predictive density on
    fully observed standardised anomaly fields ``z`` ``(T, P)`` of the fit period.

    For each candidate the variance factor has the closed-form LOO optimum
    ``scale = mean(r_i^2 / var_i)``. At most ``max_points`` random points enter the CV
    (the Cholesky is cubic in the point count).
    """
    z = z.double()
    p = z.shape[1]
    sub = torch.randperm(p, generator=generator)[:max_points] if p > max_points else None
    zs = z if sub is None else z[:, sub]
    la, lo = (lat, lon) if sub is None else (lat[sub], lon[sub])
    best, best_score = None, -math.inf
    for length in lengths:
        for nug in nuggets:
            oi = MaternOI(la.double(), lo.double(), length, nug, 1.0, nu)
            r, v = oi.loo(zs)
            scale = float((r**2 / v).mean())
            lpd = float((-0.5 * (r**2 / (v * scale) + torch.log(2 * math.pi * v * scale))).mean())
            if lpd > best_score:
                best, best_score = (length, nug, scale), lpd
    length, nug, scale = best
    return MaternOI(lat.double(), lon.double(), length, nug, scale, nu)


def zscore(values: Tensor, clim_mean: Tensor, clim_std: Tensor, groups: Tensor) -> Tensor:
    """Absolute standardised anomaly ``|x - mean_g| / std`` per point ``(T, P)``."""
    return ((values - clim_mean[groups.long()]) / clim_std).abs()


def oi_loo_residual(z: Tensor, oi: MaternOI) -> Tensor:
    """Absolute leave-one-out OI residual standardised by its predictive spread,
    ``|r_i| / sqrt(var_i)`` for fully observed anomaly fields ``(T, P)``."""
    r, v = oi.loo(z)
    return (r / v.sqrt()).abs()
