"""The localised diffusion particle filter (an approximation, for high-dimensional grids).

Same guided chain as :class:`~assim.filters.dpf.DiffusionParticleFilter`, but weights and
resampling are *local*, as in local particle filters (Poterjoy 2016, MWR 144; Farchi &
Bocquet 2018, NPG 25, the "LPF-X" state-domain family; Penny & Miyoshi 2016):

* Every grid point ``l`` carries its own log-weights ``log w_l`` ``(N,)``. An incremental
  weight is split into per-observation terms ``ell_o`` (observation-space quantities of
  :mod:`assim.guidance` decompose per observation when ``R`` is diagonal and the rows of
  ``H`` do not overlap) and, for DPS, per-state-element terms ``ell_i``; grid point ``l``
  takes ``sum_o rho(l, o) ell_o + sum_i rho(l, i) ell_i`` with ``rho`` the Gaspari–Cohn
  taper of :func:`assim.filters.letkf.local_taper` (same ``radius`` convention as our
  LETKF: Gaussian-equivalent length, GC half-width ``1.82 radius``; periodic distances
  between grid-index coordinates and :meth:`Operator.coords`).
* Resampling draws **one** uniform ``U`` and resamples every grid point systematically
  with it, ``idx_l = F_l^{-1}((j + U) / N)``, so neighbouring points with similar weights
  pick the same ancestors and particles stay smooth (the shared-uniform variant of
  local resampling). The new particle ``n`` is stitched: ``x[n, l] = x[idx_l[n], l]``;
  its chain is rebuilt on the equally stitched conditions ``x_k`` and its twist is
  recomputed.
* Local weights cannot be carried in an :class:`Ensemble` (one weight per particle), so
  the filter resamples locally at the end of every cycle.

**Hybrid ensemble-Kalman/particle update** (``hybrid = gamma`` in ``(0, 1)``): the
likelihood is split as ``g = g^{1 - gamma} g^gamma``; for Gaussian noise ``g^{1 - gamma}
∝ N(y; h(x), R / (1 - gamma))``. The guided chain, its twists and the local weights use
the tempered ``R / (1 - gamma)`` (flatter weights: less degeneracy), and after the local
resampling an LETKF (:class:`~assim.filters.letkf.LETKF`, radius ``hybrid_radius``, no
inflation) assimilates the rest, ``R / gamma``, moving every particle with the
ensemble's covariance -- which the particle weights alone cannot do. This is the
"PF then EnKF" order of the hybrids of Frei & Künsch (2013, Biometrika 100) and
Chustagulprom, Reich & Reinhardt (2016, SIAM/ASA JUQ 4); the Kalman part is exact only
for a Gaussian forecast, so the hybrid is an approximation (like the local filter
itself); ``gamma = 0`` is the plain local filter, bit for bit.

**Analysis spread factor** (``spread_factor = beta`` in ``(0, 1]``): after every analysis
(after the local resampling, the moves and the hybrid step) the anomalies are scaled,
``x_n <- xbar + beta (x_n - xbar)`` (``xbar`` the ensemble mean), so the mean is unchanged
and every variance is multiplied by ``beta^2``. This is multiplicative inflation of the
*analysis* ensemble (Anderson & Anderson 1999, MWR 127; the RTPS of Whitaker & Hamill 2012,
MWR 140, scales analysis anomalies the same way, by a factor ``> 1``) used with a factor
``< 1`` ("deflation"), a calibration knob for an over-dispersed filter; ``beta = 1`` is off
(bit for bit the old path). It is applied on analysis cycles only (not after a weight
collapse). With ``adapt_q`` the innovations see the smaller forecast spread and raise
``q``: on Lorenz-96 arctan it calibrated the spread but cost accuracy (pilots in
``experiments/results/bench_dpf_l96-arctan_b_pilots.md``).

This filter is **not** consistent: stitching particles breaks the path measure, and the
reported ``log_z`` (from untapered weights, reset at each local resampling) is only an
approximation. With ``radius = inf`` every taper is 1, all grid points share the global
weights and the uniform, and the filter coincides with the global one (tested).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf import DiffusionParticleFilter
from assim.filters.letkf import LETKF, local_taper
from assim.guidance import Guide, Increment, ObsSpace
from assim.obs import Observation, _grid
from assim.obs_noise import GaussianNoise
from assim.rng import rand
from assim.smc import ess, local_systematic, normalize, reweight
from models.diffusion.kernel import GaussianKernel

__all__ = [
    "LocalDiffusionParticleFilter",
    "check_spread_factor",
    "deflate_analysis",
    "scale_anomalies",
]


_DENSE_TAPER = 1 << 20  # a dense (m, d) taper matrix up to this many entries


class _Taper:
    """Taper ``rho`` ``(d, K)`` over neighbour lists ``idx`` ``(d, K)`` (padding: ``rho =
    0``). Small grids use the equivalent dense matrix ``T`` ``(m, d)``, ``T[idx[l, k], l] =
    rho[l, k]``: one matrix product instead of a gather (``dense=False`` forces the
    gather)."""

    def __init__(self, idx: Tensor, rho: Tensor, device, dtype, m: int, dense: bool = True):
        self.idx, self.rho = idx.to(device), rho.to(device=device, dtype=dtype)
        self.dense = None
        d = idx.shape[0]
        if dense and m * d <= _DENSE_TAPER:
            t = torch.zeros(m, d, dtype=dtype, device=device)
            cols = torch.arange(d, device=device).unsqueeze(1).expand_as(self.idx)
            self.dense = t.index_put_((self.idx, cols), self.rho, accumulate=True)

    def apply(self, terms: Tensor) -> Tensor:
        """``sum_k rho[l, k] terms[:, idx[l, k]]`` for ``terms`` ``(N, m)`` -> ``(N, d)``."""
        if self.dense is not None:
            return terms @ self.dense
        return (terms[:, self.idx] * self.rho).sum(-1)


class LocalDiffusionParticleFilter(DiffusionParticleFilter):
    """Localised diffusion particle filter (approximate; module doc).

    Args:
        radius: localisation radius in grid units (``inf``: the global filter's weights).
        periodic: periodic distances on every axis (Lorenz-96 ring, Kolmogorov torus).
        cutoff: taper coefficients below it are dropped.
        reuse_denoised: after a local resampling inside the chain, stitch the ancestors'
            denoised states and kernels column by column (:meth:`Guide.stitch`) instead
            of re-running the denoiser on the stitched particles: one network call less
            per inner resampling (2 instead of ~2.9 calls per cycle with 2 diffusion
            steps). Exact for elementwise denoisers; for a network it approximates
            ``D(x')`` near the seams between ancestors (an approximation on top of the
            local filter's own).
        hybrid: ``gamma`` in ``[0, 1)``, the share of the likelihood assimilated by the LETKF
            after the particle step (module doc); ``0``: off.
        hybrid_radius: the LETKF's localisation radius (default: ``radius``).
        spread_factor: ``beta`` in ``(0, 1]``, analysis anomalies times ``beta`` (module
            doc); ``1``: off.
        Other arguments as :class:`DiffusionParticleFilter` (``moves``: the exact pCN moves
        run *after* the local resampling, on each stitched particle's stitched final
        kernel); ``ess_threshold`` is unused
        (local weights are resampled at the end of every cycle); ``inner_threshold``
        applies to the smallest local ESS.
    """

    name = "dpf-local"
    local = True

    def __init__(
        self,
        radius: float,
        periodic: bool = True,
        cutoff: float = 1e-3,
        reuse_denoised: bool = False,
        hybrid: float = 0.0,
        hybrid_radius: float | None = None,
        spread_factor: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spread_factor = spread_factor
        if not 0.0 <= float(hybrid) < 1.0:
            raise InputError(f"hybrid must lie in [0, 1), got {hybrid!r}")
        self.hybrid = float(hybrid)
        self._kalman = None
        self._split: dict[int, tuple] = {}
        if self.hybrid > 0:
            self._kalman = LETKF(radius=radius if hybrid_radius is None else hybrid_radius,
                                 periodic=periodic, cutoff=cutoff)  # fmt: skip
            self._r_scale = 1.0 - self.hybrid
        if not float(radius) > 0:
            raise InputError(f"--radius must be > 0, got {radius!r}")
        self.radius, self.periodic, self.cutoff = float(radius), bool(periodic), float(cutoff)
        self.dense_taper = True  # False: gather path of _Taper (same numbers; for tests)
        self.reuse_denoised = bool(reuse_denoised)

    @property
    def spread_factor(self) -> float:
        """``beta`` in ``(0, 1]``: analysis anomalies are multiplied by it (1: off)."""
        return self._spread_factor

    @spread_factor.setter
    def spread_factor(self, beta: float) -> None:
        self._spread_factor = check_spread_factor(beta)

    def __repr__(self) -> str:
        extra = f", hybrid={self.hybrid}" if self.hybrid else ""
        extra += f", spread_factor={self.spread_factor}" if self.spread_factor != 1.0 else ""
        return super().__repr__()[:-1] + f", radius={self.radius}{extra})"

    def _make_space(self, obs: Any, state_shape, dtype, device) -> Any:
        sp = super()._make_space(obs, state_shape, dtype, device)
        if not sp.diagonal:
            raise InputError(
                "the localised dpf needs a diagonal R and an observation operator whose rows "
                "do not overlap (identity, every:k, coarsen, pointwise of those); use the "
                "global dpf (no --radius)"
            )
        i, r = local_taper(state_shape, obs.operator.coords(state_shape), self.radius,
                           self.periodic, self.cutoff)  # fmt: skip
        sp.taper_obs = _Taper(i, r, device, dtype, sp.m, self.dense_taper)
        sp.taper_state = None
        if self.twist in ("dps", "dps_only"):
            i, r = local_taper(state_shape, _grid(state_shape), self.radius, self.periodic,
                               self.cutoff)  # fmt: skip
            sp.taper_state = _Taper(i, r, device, dtype, i.shape[0], self.dense_taper)
        return sp

    # ---------------------------------------------------------------- local weights
    def _weights(self, log_w: Tensor, n: int, space: ObsSpace | None) -> dict[str, Any]:
        d = math.prod(space.state_shape) if space is not None else 1
        return {"log_w": log_w, "local": log_w.expand(d, n).clone(), "space": space}

    def _add(self, w: dict[str, Any], inc: Increment, n: int, like: Tensor) -> float:
        sp = w["space"]
        loc = like.new_zeros(n, w["local"].shape[0])
        if inc.obs is not None:
            loc = loc + sp.taper_obs.apply(inc.obs)
        if inc.state is not None:
            loc = loc + sp.taper_state.apply(inc.state)
        w["local"] = normalize(w["local"] + loc.T)[0]  # w["local"] is kept normalised
        w["log_w"], dz = reweight(w["log_w"], inc.total(n, like))
        return float(dz)

    def _ess(self, w: dict[str, Any]) -> float:
        return float(ess(w["local"]).min())

    def _resample(self, w: dict[str, Any], n: int, generator) -> Tensor:
        u = rand((1,), generator, device=w["local"].device, dtype=torch.float64)
        idx = local_systematic(w["local"], u)
        w["local"] = torch.full_like(w["local"], -math.log(n))
        w["log_w"] = torch.full_like(w["log_w"], -math.log(n))
        return idx

    def _gather(self, t: Tensor, idx: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1)
        return torch.gather(flat, 0, idx.T.to(t.device)).reshape(t.shape)

    def _after_resample(self, guide: Guide, chain: Any, x: Tensor, idx: Tensor, j: int) -> None:
        if self.reuse_denoised and guide.stitch(chain, lambda t: self._gather(t, idx), j):
            return
        guide.refresh(chain, x, j)

    def _final_log_w(self, w: dict[str, Any]) -> Tensor:
        return w["local"].T

    # ---------------------------------------------------------------- the cycle
    def cycle(
        self,
        world: Any,
        ensemble: Ensemble,
        y: Tensor | None,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Guided chain with local weights, then local resampling (equal weights out),
        then the optional exact moves, the optional hybrid LETKF step and the optional
        analysis spread factor."""
        obs_pf, obs_kf = self._split_obs(obs) if self.hybrid > 0 else (obs, None)
        x, log_w, info = self.propagate(world, ensemble, y, obs_pf, generator)
        n = x.shape[0]
        uniform = torch.full((n,), -math.log(n), dtype=x.dtype, device=x.device)
        if info.get("skipped"):
            return Ensemble(x, normalize(log_w[:, 0])[0]), info
        local = log_w.T
        info["mean_local_ess"] = float(ess(local).mean())
        u = rand((1,), generator, device=x.device, dtype=torch.float64)
        idx = local_systematic(local, u)
        x = self._gather(x, idx)
        if self._final is not None:  # stitched kernel: column l from ancestor idx[l, n]
            kern, space, y_obs = self._final

            def g(t: Tensor) -> Tensor:
                return self._gather(t.expand_as(x), idx)

            self._final = (GaussianKernel(g(kern.mean), g(kern.var)), space, y_obs)
            with torch.no_grad():
                x = self._move(x, generator, info)
        ens = Ensemble(x, uniform)
        if obs_kf is not None and not info.get("collapsed"):
            ens, kinfo = self._kalman.analysis(ens, y, obs_kf, generator)
            info["log_z"] += kinfo["log_z"]  # Gaussian approximation of the Kalman part
            info["hybrid"] = self.hybrid
        return deflate_analysis(ens, info, self.spread_factor), info

    def _split_obs(self, obs: Any) -> tuple[Any, Any]:
        """``(obs with R / (1 - gamma), obs with R / gamma)`` (cached per ``obs``)."""
        hit = self._split.get(id(obs))
        if hit is None or hit[0] is not obs:
            noise = obs.noise
            if not isinstance(noise, GaussianNoise):
                raise InputError(f"hybrid needs Gaussian observation noise, got {noise!r}")

            def scaled(c: float) -> Observation:
                new = (
                    GaussianNoise(R=noise.R * c)
                    if noise.R is not None
                    else GaussianNoise(var=noise.var * c)
                )
                return Observation(obs.operator, new)

            hit = (obs, scaled(1.0 / (1.0 - self.hybrid)), scaled(1.0 / self.hybrid))
            self._split[id(obs)] = hit  # holds obs: its id cannot be reused while cached
            while len(self._split) > 8:
                self._split.pop(next(iter(self._split)))
        return hit[1], hit[2]


def scale_anomalies(ens: Ensemble, beta: float) -> Ensemble:
    """``xbar + beta (x - xbar)`` for particles ``x`` ``(N, *S)`` with the weighted mean
    ``xbar`` ``(*S)``; the weights are kept (weighted mean unchanged, weighted variances
    times ``beta^2``)."""
    m = ens.mean()
    return Ensemble(m + beta * (ens.x - m), ens.log_w)


def check_spread_factor(beta: float) -> float:
    """``beta`` as a float when it lies in ``(0, 1]`` (NaN rejected), else :class:`InputError`."""
    if not 0.0 < float(beta) <= 1.0:
        raise InputError(f"spread_factor must lie in (0, 1], got {beta!r}")
    return float(beta)


def deflate_analysis(ens: Ensemble, info: dict[str, Any], beta: float) -> Ensemble:
    """The analysis spread factor of a filter cycle: :func:`scale_anomalies` by ``beta``
    (recorded in ``info["spread_factor"]``), unless ``beta = 1`` or the cycle's weights
    collapsed (``info["collapsed"]``); then ``ens`` itself."""
    if beta == 1.0 or info.get("collapsed"):
        return ens
    info["spread_factor"] = beta
    return scale_anomalies(ens, beta)
