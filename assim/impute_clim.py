"""Harmonic climatology for short records (a few years of monthly fields).

With ``Y`` years of monthly data a per-calendar-month mean is the average of ``Y``
values: its error variance ``sigma^2 / Y`` enters every anomaly of that month (at
``Y = 3.6``, ``ostia_sst``'s fit period, a quarter of the anomaly variance). A mean
annual cycle of ``H`` harmonics,

    m_g = a_0 + sum_{h=1}^{H} a_h cos(2 pi h g / G) + b_h sin(2 pi h g / G),

has ``1 + 2H`` coefficients per point instead of ``G`` (Wilks 2011, §9.4; ``H = G/2``
reproduces the monthly means on complete years). Fitted by least squares per point on
the observed entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from assim.errors import InputError

__all__ = ["harmonic_climatology"]


def harmonic_climatology(
    values: Tensor, groups: Tensor, n_groups: int, harmonics: int
) -> tuple[Tensor, Tensor]:
    """Mean ``(G, P)`` of the ``harmonics``-term annual cycle fitted to ``values``
    ``(T, P)`` (NaN = missing) at season indices ``groups`` ``(T,)`` in ``0..G-1``, and
    the pooled std ``(P,)`` of the anomalies (floored at 1e-6), as
    :func:`assim.baselines.grouped_climatology` returns them. A point needs at least
    ``1 + 2 harmonics`` observed entries (else its mean is the overall mean)."""
    if not 0 <= harmonics <= n_groups // 2:
        raise InputError(f"harmonics must be in [0, {n_groups // 2}], got {harmonics}")
    g = groups.long()
    ph = 2 * math.pi * torch.arange(n_groups, dtype=torch.float64) / n_groups
    cols = [torch.ones_like(ph)]
    for h in range(1, harmonics + 1):
        cols += [torch.cos(h * ph), torch.sin(h * ph)]
        if 2 * h == n_groups:  # the Nyquist sine is zero at every group
            cols.pop()
    basis = torch.stack(cols, 1)  # (G, n_coef)
    x = basis[g]  # (T, n_coef)
    vals = values.double()
    w = torch.isfinite(vals).double()  # (T, P)
    y = vals.nan_to_num(0.0)
    xtx = torch.einsum("tp,ti,tj->pij", w, x, x)  # (P, c, c)
    xty = torch.einsum("tp,ti->pi", w * y, x)  # (P, c)
    ok = w.sum(0) >= x.shape[1]
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(torch.where(ok[:, None, None], xtx, eye), xty[..., None])[..., 0]
    mean = (basis @ coef.T).contiguous()  # (G, P)
    overall = torch.nanmean(vals, 0).nan_to_num(0.0)
    mean = torch.where(ok[None], mean, overall[None])
    anom = vals - mean[g]
    std = torch.sqrt(torch.nanmean(anom**2, 0)).nan_to_num(1.0).clamp_min(1e-6)
    return mean, std
