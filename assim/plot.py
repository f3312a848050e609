"""Quicklook figures (matplotlib, Agg): Hovmöller diagrams and panel grids of 2-D
fields, saved atomically as PNG (temporary file in the same folder + ``os.replace``).

Figures are built with :class:`matplotlib.figure.Figure` directly, so no GUI
backend or global pyplot state is involved.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from assim.errors import InputError


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if hasattr(x, "values") and not isinstance(x, np.ndarray):
        x = x.values
    return np.asarray(x, dtype=np.float64)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write PNG ({type(exc).__name__}: {exc})") from exc
    return path


def _limits(a: np.ndarray, symmetric: bool) -> tuple[float, float]:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return -1.0, 1.0
    if symmetric:
        m = float(np.abs(finite).max()) or 1.0
        return -m, m
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 1.0, hi + 1.0)


def hovmoller(
    field: Any,
    path: str | os.PathLike,
    times: Any | None = None,
    x: Any | None = None,
    title: str = "",
    label: str = "",
    xlabel: str = "x",
    tlabel: str = "time",
    cmap: str = "RdBu_r",
    symmetric: bool = False,
) -> Path:
    """Hovmöller (time × space) diagram of a ``(T, X)`` field saved to ``path``.

    ``times`` (length T, numeric) and ``x`` (length X) label the axes; default indices.
    """
    a = _numpy(field)
    if a.ndim != 2:
        raise InputError(f"hovmoller: expected a (time, x) field, got shape {a.shape}")
    t = np.arange(a.shape[0]) if times is None else _numpy(times)
    xs = np.arange(a.shape[1]) if x is None else _numpy(x)
    vmin, vmax = _limits(a, symmetric)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(xs, t, a, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
    fig.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(tlabel)
    ax.set_title(title)
    return save_figure(fig, path)


def field_grid(
    fields: Any,
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    suptitle: str = "",
    label: str = "",
    cmap: str = "RdBu_r",
    symmetric: bool = False,
) -> Path:
    """A grid of ``K`` 2-D fields ``(K, H, W)`` on one shared colour scale (NaN shown
    blank, e.g. land), saved to ``path``."""
    a = _numpy(fields)
    if a.ndim != 3:
        raise InputError(f"field_grid: expected fields (K, H, W), got shape {a.shape}")
    k = a.shape[0]
    if titles is not None and len(titles) != k:
        raise InputError(f"field_grid: {k} fields but {len(titles)} titles")
    ncols = max(1, min(ncols, k))
    nrows = -(-k // ncols)
    vmin, vmax = _limits(a, symmetric)
    aspect = a.shape[1] / a.shape[2]
    fig = Figure(figsize=(3 * ncols + 1, max(1.5, 3 * aspect) * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.set_axis_off()
            continue
        im = ax.imshow(a[i], origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label=label, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)
