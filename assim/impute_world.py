"""Dynamical imputation of space-time gaps: a stochastic ensemble Kalman smoother (EnKS)
run with a learned world model.

A window ``(T, P)`` of fields (``P`` grid points, NaN = missing) is treated as a
partially observed trajectory of the world ``x_{k+1} ~ p_world(. | x_k)``. Members
``x^i``, ``i = 1..N``, are propagated by the world and conditioned step by step on the
observed entries ``y_k = x_{k,O_k} + eps``, ``eps ~ N(0, r^2 I)`` (``r = 0``: exact
observations, the imputation case). Each step:

1. **Forecast** ``x_f^i = step(x_a^i(k-1))`` (step 0: the initial ensemble ``x0``).
   Multiplicative inflation ``lambda``: ``x_f^i <- m + sqrt(lambda) (x_f^i - m)``.
2. **Hybrid covariance** ``P_f = rho o (A^T A / (N-1)) + alpha^2 B`` with forecast
   anomalies ``A`` ``(N, P)``, a Gaspari-Cohn taper ``rho`` (Schur product; Houtekamer &
   Mitchell 2001) and a static covariance ``B`` (additive inflation / model error,
   Hamill & Snyder 2000); consistently each member gets a draw ``alpha B^{1/2} xi^i``.
3. **Analysis** (stochastic EnKF with perturbed observations, Burgers et al. 1998):
   ``d^i = y_k + r eps^i - x_{f,O}^i``, ``x_a^i = x_f^i + P_{f,:O} (P_{f,OO} + r^2 I)^{-1}
   d^i``. With ``r = 0`` this is Matheron's rule: if the ``x_f^i`` were draws of
   ``N(m, P_f)`` the ``x_a^i`` are exact draws of the Gaussian conditional given the
   observed entries, which they reproduce exactly.
4. **Smoother** (EnKS, Evensen & van Leeuwen 2000): every stored state ``j = k-1, ...,
   k-L`` (lag ``L``) gets the same innovations through the ensemble's time
   cross-covariance ``C_{j,k} = rho o (A_j^T A / (N-1))`` (``A_j``: anomalies of the
   current smoothed ensemble at ``j``; ``A``: the forecast anomalies of step 2 without the
   additive draw, which is independent of the past):
   ``x_{s,j}^i <- x_{s,j}^i + C_{j,k,:O} (P_{f,OO} + r^2 I)^{-1} d^i``.

The returned members are the smoothed ensemble ``(N, T, P)``: samples of the missing
entries given everything observed in the window (past and future within the lag). An
optional output calibration ``c`` (:attr:`SmootherConfig.spread`) multiplies their
deviations from the ensemble mean (the mean is unchanged).

**Exactness and approximation.** For a linear-Gaussian world (``x_{k+1} = M x_k + w``,
``w ~ N(0, Q)``), no taper, ``alpha = 0``, ``lambda = 1`` and a lag covering the window,
the EnKS is consistent: its members' mean and covariance converge to the Kalman (RTS)
smoother's as ``N -> oo`` (Evensen & van Leeuwen 2000). With ``Q = 0`` and ``r = 0`` the
update is linear in the members with a gain built from their own sample moments, so an
initial ensemble with exact sample moments gives the Kalman smoother's mean and
covariance exactly (tested in ``tests/test_impute_world.py``). Around a nonlinear
learned world the update is only an ensemble *Gaussian* approximation of the smoothing
distribution (linear regression of the state on the forecast observations), with
sampling error from ``N`` members that the taper and ``B`` control; ``lambda``,
``alpha``, the taper radius and ``c`` are tuning choices, to be fitted on validation
data. The Gaspari-Cohn taper wrapped on a torus is only guaranteed positive
semi-definite while its support ``2 x 1.82 radius`` stays within half the domain (e.g.
``radius <= 4`` on 32 points); with ``alpha > 0`` a full-rank ``B`` keeps ``P_f``
positive definite anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.letkf import _GC_SCALE, gaspari_cohn
from assim.rng import randn

__all__ = [
    "SmootherConfig",
    "ensemble_smoother",
    "forecast_error_cov",
    "impute_world",
    "stationary_cov",
    "torus_taper",
    "world_step",
]

Step = Callable[[Tensor, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class SmootherConfig:
    """Tuning of :func:`ensemble_smoother`: multiplicative ``inflation`` ``lambda``
    (variance factor on forecast anomalies, >= 1 widens), ``additive`` ``alpha`` (std
    factor of the static covariance ``B``), ``lag`` ``L`` (steps smoothed backwards; a
    value >= T smooths the whole window), ``obs_std`` ``r`` (0: exact observations) and
    ``spread`` ``c``: a calibration factor applied to the output only, the smoothed
    members' deviations from their mean are multiplied by ``c`` (1: the EnKS as is; a
    posterior analogue of inflation, fitted on held-out data)."""

    inflation: float = 1.0
    additive: float = 0.0
    lag: int = 4
    obs_std: float = 0.0
    spread: float = 1.0

    def __post_init__(self) -> None:
        if not self.inflation > 0:
            raise InputError(f"inflation must be > 0, got {self.inflation}")
        if self.additive < 0 or self.obs_std < 0:
            raise InputError(
                f"additive and obs_std must be >= 0, got {self.additive}, {self.obs_std}"
            )
        if not self.spread > 0:
            raise InputError(f"spread must be > 0, got {self.spread}")
        if self.lag < 0:
            raise InputError(f"lag must be >= 0, got {self.lag}")


def torus_taper(shape: tuple[int, int], radius: float) -> Tensor:
    """Gaspari-Cohn correlation ``(P, P)`` between the points of a periodic grid ``shape``
    (C order), distances in grid units on the torus; ``radius`` is the
    Gaussian-equivalent length of :class:`~assim.filters.letkf.LETKF` (GC half-width
    ``1.82 radius``). Positive semi-definite while the support ``2 x 1.82 radius`` stays
    within half of each axis (GC is a correlation function in the plane; wrapped on the
    torus beyond that it may not be)."""
    if not radius > 0:
        raise InputError(f"taper radius must be > 0, got {radius}")
    ny, nx = shape
    iy, ix = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    iy, ix = iy.reshape(-1).double(), ix.reshape(-1).double()
    dy = (iy[:, None] - iy[None, :]).abs()
    dx = (ix[:, None] - ix[None, :]).abs()
    dy, dx = torch.minimum(dy, ny - dy), torch.minimum(dx, nx - dx)
    return gaspari_cohn((dy**2 + dx**2).sqrt() / (_GC_SCALE * radius))


def stationary_cov(fields: Tensor) -> Tensor:
    """Covariance ``(P, P)`` of a homogeneous random field on a periodic grid estimated
    from samples ``fields`` ``(M, ny, nx)`` (zero mean assumed): the averaged periodogram
    ``S(k) = mean_m |F e_m(k)|^2 / P`` gives the circulant covariance ``c(delta) =
    F^{-1} S`` (Wiener-Khinchin), ``Cov(e_p, e_q) = c(p - q)`` mod the grid. Positive
    semi-definite by construction (non-negative spectrum)."""
    if fields.ndim != 3 or fields.shape[0] < 1:
        raise InputError(f"fields must be (M, ny, nx) with M >= 1, got {tuple(fields.shape)}")
    m, ny, nx = fields.shape
    spec = (torch.fft.fft2(fields.double()).abs() ** 2).mean(0) / (ny * nx)
    c = torch.fft.ifft2(spec).real  # c[dy, dx]
    iy, ix = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    iy, ix = iy.reshape(-1), ix.reshape(-1)
    return c[(iy[:, None] - iy[None, :]) % ny, (ix[:, None] - ix[None, :]) % nx]


def ensemble_smoother(
    step: Step,
    x0: Tensor,
    y: Tensor,
    config: SmootherConfig = SmootherConfig(),
    static: Tensor | None = None,
    taper: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic EnKS over a window (module docstring).

    Args:
        step: one world step ``(N, P) -> (N, P)`` (``step(x, generator)``).
        x0: initial ensemble ``(N, P)``: draws of the state at the window's first step
            before its observations are assimilated.
        y: the window ``(T, P)``; NaN entries are unobserved.
        config: :class:`SmootherConfig`.
        static: static covariance ``B`` ``(P, P)`` (used when ``config.additive > 0``).
        taper: localisation ``rho`` ``(P, P)`` (``None``: no localisation).
        generator: drives the additive and observation perturbations (and is passed to
            ``step``).

    Returns:
        smoothed members ``(N, T, P)`` and their mean ``(T, P)``, in ``x0``'s dtype;
        with ``obs_std = 0`` the observed entries equal ``y`` exactly.
    """
    if x0.ndim != 2 or y.ndim != 2 or x0.shape[1] != y.shape[1]:
        raise InputError(
            f"x0 must be (N, P) and y (T, P) with the same P; got {tuple(x0.shape)}, "
            f"{tuple(y.shape)}"
        )
    n, p = x0.shape
    if n < 2:
        raise InputError(f"need at least 2 members, got {n}")
    dev, dt = x0.device, x0.dtype
    y = y.to(device=dev, dtype=dt)
    for name, mat in (("static", static), ("taper", taper)):
        if mat is not None and tuple(mat.shape) != (p, p):
            raise InputError(f"{name} must be ({p}, {p}), got {tuple(mat.shape)}")
    alpha, r = float(config.additive), float(config.obs_std)
    if alpha > 0 and static is None:
        raise InputError("config.additive > 0 needs a static covariance")
    if alpha > 0:
        b = static.to(device=dev, dtype=dt)
        jitter = 1e-10 * float(torch.diagonal(b).mean())
        b_chol = torch.linalg.cholesky(b + jitter * torch.eye(p, dtype=dt, device=dev))
    rho = None if taper is None else taper.to(device=dev, dtype=dt)
    smoothed: list[Tensor] = []
    xa = x0
    for k in range(y.shape[0]):
        xf = xa if k == 0 else step(xa, generator).to(device=dev, dtype=dt)
        m = xf.mean(0)
        a = (xf - m) * math.sqrt(config.inflation)
        xf = m + a
        cov = a.T @ a / (n - 1)
        if rho is not None:
            cov = cov * rho
        if alpha > 0:
            cov = cov + alpha**2 * b
            xf = xf + alpha * randn((n, p), generator, device=dev, dtype=dt) @ b_chol.T
        io = torch.isfinite(y[k]).nonzero().squeeze(1)
        xa = xf
        if io.numel():
            d = y[k, io] - xf[:, io]
            if r > 0:
                d = d + r * randn((n, io.numel()), generator, device=dev, dtype=dt)
            w = torch.cholesky_solve(d.T, _chol(cov[io][:, io], r**2)).T  # (N, n_O)
            xa = xf + w @ cov[io]
            for j in range(max(0, k - config.lag), k):  # EnKS: earlier states
                aj = smoothed[j] - smoothed[j].mean(0)
                c = aj.T @ a[:, io] / (n - 1)  # (P, n_O) cross-covariance
                if rho is not None:
                    c = c * rho[:, io]
                smoothed[j] = smoothed[j] + w @ c.T
            if r == 0:
                xa[:, io] = y[k, io]
        smoothed.append(xa)
    out = torch.stack(smoothed, 1)
    if config.spread != 1.0:
        mean = out.mean(0)
        out = mean + config.spread * (out - mean)
    if r == 0:
        obs = torch.isfinite(y)
        out[:, obs] = y[obs]
    return out, out.mean(0)


def _chol(s: Tensor, r2: float) -> Tensor:
    """Cholesky factor of ``s + r2 I``; a rank-deficient ``s`` (a collapsed ensemble seen
    by exact observations) gets the smallest relative jitter ``10^-12 .. 10^-6`` that
    makes it positive definite."""
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    scale = float(torch.diagonal(s).mean())
    scale = scale if scale > 0 else 1.0  # an ensemble collapsed at every observed entry
    for rel in (1e-12, 1e-10, 1e-8, 1e-6):
        chol, info = torch.linalg.cholesky_ex(s + (r2 + rel * scale) * eye)
        if int(info) == 0:
            return chol
    raise torch.linalg.LinAlgError("forecast covariance of the observed entries is not PD")


def world_step(world) -> Step:
    """Adapter from a world (``world.step((N, *S), generator)``, e.g. a conditional
    diffusion world, :mod:`models.worlds.conditional`) to flattened states ``(N, P)``:
    states are cast to the world's dtype and device and back."""
    shape = tuple(world.state_shape)
    ref = next(iter(world.buffers()), None) if hasattr(world, "buffers") else None

    def step(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        xs = x.reshape(x.shape[0], *shape)
        if ref is not None:
            xs = xs.to(device=ref.device, dtype=ref.dtype)
        out = world.step(xs, generator=generator)
        return out.reshape(x.shape[0], -1).to(device=x.device, dtype=x.dtype)

    return step


@torch.no_grad()
def forecast_error_cov(
    world, frames: Tensor, generator: torch.Generator | None = None, batch: int = 64
) -> Tensor:
    """Static covariance ``B`` ``(P, P)`` of the world's one-step forecast errors
    ``e_k = step(x_k) - x_{k+1}`` over consecutive ``frames`` ``(T, ny, nx)`` of a
    periodic field (e.g. a fit period), by :func:`stationary_cov` (errors centred by
    their mean)."""
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise InputError(f"frames must be (T >= 2, ny, nx), got {tuple(frames.shape)}")
    f = world_step(world)
    x = frames.reshape(frames.shape[0], -1).double()
    src, dst = x[:-1], x[1:]
    err = torch.cat([f(src[i : i + batch], generator) for i in range(0, len(src), batch)]) - dst
    err = err - err.mean(0)
    return stationary_cov(err.reshape(-1, *frames.shape[1:]))


def impute_world(
    world,
    values: Tensor,
    x0: Tensor,
    config: SmootherConfig = SmootherConfig(),
    static: Tensor | None = None,
    radius: float | None = 4.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Samples ``(N, T, P)`` and mean ``(T, P)`` of the missing (NaN) entries of a window
    ``values`` ``(T, P)`` (or ``(T, ny, nx)``) on the world's periodic grid, by
    :func:`ensemble_smoother` with the world's steps, initial ensemble ``x0`` ``(N, P)``
    (e.g. climatological draws), a torus taper of ``radius`` grid units (``None``: no
    localisation) and static covariance ``static`` (e.g. :func:`forecast_error_cov`).
    The window's frames must be one world step ``world.dt`` apart. Observed entries are
    the input's bit for bit, in its dtype."""
    shape = tuple(world.state_shape)
    p = math.prod(shape)
    vals = values.reshape(values.shape[0], -1)
    if vals.shape[1] != p:
        raise InputError(
            f"window has {vals.shape[1]} points per step, the world's grid {shape} has {p}"
        )
    if not bool(torch.isfinite(vals).any()):
        raise InputError("nothing is observed: every value is NaN")
    if x0.ndim != 2 or x0.shape[1] != p:
        raise InputError(f"x0 must be (N, {p}), got {tuple(x0.shape)}")
    taper = None if radius is None else _taper_for(shape, radius)
    smp, mean = ensemble_smoother(
        world_step(world), x0.double(), vals.double(), config, static, taper, generator
    )
    obs = torch.isfinite(vals)
    smp, mean = smp.to(vals.dtype), mean.to(vals.dtype)
    smp[:, obs] = vals[obs]
    mean[obs] = vals[obs]
    return smp, mean


def _taper_for(shape: tuple[int, ...], radius: float) -> Tensor | None:
    """:func:`torus_taper` for a 2-D grid, ``None`` for an infinite radius."""
    if math.isinf(radius):
        return None
    if len(shape) != 2:
        raise InputError(f"localisation needs a 2-D periodic grid, got state shape {shape}")
    return torus_taper((int(shape[0]), int(shape[1])), radius)


def impute_field(
    da,
    world,
    n: int = 32,
    level: float = 0.9,
    generator: torch.Generator | None = None,
    config: SmootherConfig | None = None,
    radius: float | None = 2.0,
    min_static_frames: int = 20,
):
    """Impute the NaN entries of ``da`` ``(time, y, x)`` with the world's ensemble
    smoother; returns the Dataset of :func:`assim.impute.impute` (members, mean, interval,
    ``imputed`` flags).

    The initial ensemble is ``n`` random complete (NaN-free) frames of ``da``; the static
    covariance ``B`` comes from the world's one-step errors on the longest run of
    consecutive complete frames when it has ``min_static_frames`` of them (else no
    additive term). ``config`` defaults to the values tuned on Kolmogorov 32² held-out
    frames (``additive`` 1.5, ``lag`` 4, ``spread`` 0.8; ``experiments/bench_impute.py``).
    The frames must be one world step apart and on the world's grid."""
    import dataclasses

    import numpy as np

    from assim.impute import imputation_dataset

    shape = tuple(int(s) for s in world.state_shape)
    name = da.name or "field"
    if da.ndim != 3 or tuple(da.shape[1:]) != shape:
        raise InputError(
            f"variable {name!r} has shape {tuple(da.shape)}; the world needs (time, *{shape})"
        )
    tname = "model_time" if "model_time" in da.coords else da.dims[0]  # assim simulate
    t = np.asarray(da[tname].values)
    if t.size > 1 and np.issubdtype(t.dtype, np.number):
        dt = np.diff(t.astype(float))
        if not np.allclose(dt, float(world.dt), rtol=1e-3):
            raise InputError(
                f"variable {name!r}: frames are {np.unique(dt.round(6))} apart in "
                f"{tname!r}; the world's step is {world.dt}"
            )
    vals = torch.as_tensor(np.asarray(da.values)).reshape(da.shape[0], -1)
    complete = torch.isfinite(vals).all(1)
    if int(complete.sum()) < 2:
        raise InputError(
            f"variable {name!r}: the world's smoother draws its initial ensemble from complete "
            f"(NaN-free) frames; found {int(complete.sum())}, need >= 2"
        )
    pool = vals[complete].double()
    x0 = pool[torch.randint(len(pool), (n,), generator=generator)]
    best, start = (0, 0), 0  # longest run of consecutive complete frames
    for i, ok in enumerate([*complete.tolist(), False]):
        if not ok:
            best, start = max(best, (i - start, start)), i + 1
    static = None
    if best[0] >= min_static_frames:
        frames = vals[best[1] : best[1] + best[0]].double().reshape(-1, *shape)
        static = forecast_error_cov(world, frames, generator)
    cfg = config or SmootherConfig(additive=1.5, lag=4, spread=0.8)
    if static is None:
        cfg = dataclasses.replace(cfg, additive=0.0)
    smp, mean = impute_world(world, vals, x0, cfg, static, radius, generator)
    attrs = {
        "prior": f"world model ({getattr(world, 'kind', type(world).__name__)})",
        "method": "ensemble Kalman smoother through the world (assim.impute_world; "
        f"additive {cfg.additive}, lag {cfg.lag}, spread {cfg.spread}, radius {radius})",
    }
    return imputation_dataset(da, np.ones(shape, bool), smp, mean, level, attrs)
