"""Bootstrap particle filter (Gordon, Salmond & Smith 1993) over any world model.

The proposal is the world's own stochastic step (``Filter.cycle`` forecasts with
``world.step``); the analysis multiplies the weights by ``p(y | x_i)``
(``obs.log_likelihood``) through :func:`assim.smc.reweight`, which also gives the
evidence increment ``log p(y_k | y_{1:k-1}) ≈ log sum_i W_i p(y_k | x_i)``, and then
resamples adaptively when ``ESS < threshold * N``. Weights are carried across cycles
when no resampling happens, so the product of increments stays an unbiased estimate
of ``p(y_{1:K})``.

Optional regularisation ("jitter"; Musso, Oudjane & Le Gland 2001; DAPPER's
``PartFilt(reg, nuj=True)``): after a resampling, every particle that was drawn more
than once (``jitter_all=True``: every particle) moves by ``N(0, jitter^2 C)`` with
``C`` the weighted ensemble covariance before resampling (``jitter_mode="spread"``;
full ``C`` up to 2000 state elements, its diagonal above) or by ``N(0, jitter^2 I)``
(``"absolute"``). DAPPER's ``reg=r`` is ``jitter = r * scott_bandwidth(N, d)``.
Jitter makes the filter approximate (it widens the posterior); it is off by default.
The resampling trigger is ``ESS < threshold * N`` (DAPPER's ``NER``, up to ``<=``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble, Filter
from assim.rng import randn
from assim.smc import WeightCollapse, ess, get_resampler, reweight

_FULL_COV_MAX = 2000


def scott_bandwidth(n: int, d: int) -> float:
    """Scott's rule-of-thumb kernel bandwidth ``n^(-1/(d+4))`` (Doucet, de Freitas &
    Gordon 2001, sec. 12.2.2). DAPPER's ``PartFilt(reg=r)`` is ``jitter = r *
    scott_bandwidth(N, d)``."""
    return float(n) ** (-1.0 / (d + 4))


def _jitter_noise(
    x: Tensor, log_w: Tensor, n: int, mode: str, generator: torch.Generator | None
) -> Tensor:
    """``(n, *S)`` draws of ``N(0, C)`` (``mode="spread"``) or ``N(0, I)`` (``"absolute"``).

    ``C`` is the weighted covariance of ``x`` with the unbiasing factor
    ``1 / (1 - sum w^2)``; when the weights are degenerate (one weight ~ 1) the equally
    weighted covariance is used instead, so that a collapsed filter still gets jitter.
    Particles with non-finite states (weight zero) are left out.
    """
    flat = x.reshape(x.shape[0], -1)
    eps = randn((n, flat.shape[1]), generator, device=x.device, dtype=x.dtype)
    if mode == "absolute":
        return eps.reshape(n, *x.shape[1:])
    finite = torch.isfinite(flat).all(1)
    flat = torch.where(finite.unsqueeze(1), flat, torch.zeros_like(flat))
    w = log_w.exp().to(x.dtype) * finite
    if float(1.0 - w.max()) < 1e-10:
        w = finite.to(x.dtype) / finite.sum().clamp_min(1)
    ub = 1.0 / (1.0 - (w * w).sum()).clamp_min(1e-12)
    mu = w @ flat
    anom = (flat - mu) * (ub * w).sqrt().unsqueeze(1)
    if flat.shape[1] <= _FULL_COV_MAX:
        C = (anom.T @ anom).double()
        C = C + 1e-12 * torch.diagonal(C).mean().clamp_min(1e-300) * torch.eye(
            C.shape[0], dtype=C.dtype, device=C.device
        )
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) == 0:
            return (eps @ L.T.to(x.dtype)).reshape(n, *x.shape[1:])
    std = (anom**2).sum(0).sqrt()
    return (eps * std).reshape(n, *x.shape[1:])


def _duplicated(idx: Tensor, n: int) -> Tensor:
    """Boolean ``(len(idx),)``: true where ``idx[j]`` occurs more than once."""
    return torch.bincount(idx, minlength=n)[idx] > 1


class BootstrapPF(Filter):
    """Bootstrap particle filter.

    ``resample``: scheme name (``systematic``, ``stratified``, ``residual``,
    ``multinomial``); ``threshold``: resample when ``ESS < threshold * N`` (1: every
    cycle); ``jitter`` / ``jitter_mode`` / ``jitter_all``: regularisation after
    resampling (module doc); ``reg``: DAPPER's parametrisation, ``jitter = reg *
    scott_bandwidth(N, d)`` (excludes ``jitter``).

    ``info``: ``ess`` (after the update, before resampling), ``log_z`` (evidence
    increment; ``-inf`` if collapsed), ``inflation`` (1), ``resampled``,
    ``collapsed`` (every weight zero: particles and weights are kept unchanged).
    """

    name = "pf"

    def __init__(
        self,
        resample: str = "systematic",
        threshold: float = 0.5,
        jitter: float = 0.0,
        jitter_mode: str = "spread",
        jitter_all: bool = False,
        reg: float | None = None,
    ) -> None:
        get_resampler(resample)
        if not 0.0 <= threshold:
            raise InputError(f"--threshold must be >= 0, got {threshold}")
        if jitter < 0:
            raise InputError(f"--jitter must be >= 0, got {jitter}")
        if jitter_mode not in ("spread", "absolute"):
            raise InputError(f"jitter_mode must be 'spread' or 'absolute', got {jitter_mode!r}")
        self.resample, self.threshold = resample, float(threshold)
        self.jitter, self.jitter_mode = float(jitter), jitter_mode
        self.jitter_all = bool(jitter_all)
        if reg is not None and (reg < 0 or jitter > 0):
            raise InputError(
                f"reg must be >= 0 and excludes jitter, got reg={reg}, jitter={jitter}"
            )
        self.reg = None if reg is None else float(reg)

    def analysis(
        self,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        x, log_w = ensemble.x, ensemble.log_w
        log_lik = obs.log_likelihood(y, x)
        try:
            new_log_w, log_z = reweight(log_w, log_lik)
        except WeightCollapse:
            info = {
                "ess": float(ess(log_w)),
                "log_z": -math.inf,
                "inflation": 1.0,
                "resampled": False,
                "collapsed": True,
            }
            return Ensemble(x, log_w), info
        info = {
            "ess": float(ess(new_log_w)),
            "log_z": float(log_z),
            "inflation": 1.0,
            "collapsed": False,
        }
        # particles whose state is not finite (a blown-up forecast) have weight zero;
        # resample now so that they leave the ensemble (0 * NaN would poison means)
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        threshold = self.threshold if bool(finite.all()) else 1.0
        n = x.shape[0]
        done = threshold >= 1 or info["ess"] < threshold * n
        if not done:
            return Ensemble(x, new_log_w), {**info, "resampled": False}
        idx = get_resampler(self.resample)(new_log_w, n, generator).to(x.device)
        x_new = x[idx]
        w_new = torch.full_like(new_log_w, -math.log(n))
        d = x[0].numel()
        jitter = self.jitter if self.reg is None else self.reg * scott_bandwidth(n, d)
        if jitter > 0:
            noise = jitter * _jitter_noise(x, new_log_w, n, self.jitter_mode, generator)
            if not self.jitter_all:  # DAPPER's default (nuj): particles drawn once stay
                dup = _duplicated(idx, n).reshape(-1, *([1] * (x.dim() - 1)))
                noise = noise * dup.to(noise.dtype)
            x_new = x_new + noise
        info["resampled"] = done
        return Ensemble(x_new, w_new), info
