"""The one sequential Monte Carlo engine (DESIGN.md §2), for physical time (particle
filters) and diffusion time (guided sampling) alike.

Weights are kept as log-weights ``log_w`` ``(N,)``. A step multiplies them by an
incremental weight ``G`` (``log_incr``) and the evidence estimate grows by
``log sum_i W_i G_i`` with ``W`` the *normalised* weights before the step
(:func:`reweight`); when resampling is adaptive (:func:`maybe_resample`) the weights
that are not reset simply carry over, which keeps ``prod_k sum_i W_i G_i`` an unbiased
estimate of ``Z`` (Del Moral 2004; Chopin & Papaspiliopoulos 2020, ch. 10).

Resampling schemes are pure functions ``scheme(log_w, n, generator) -> indices (n,)``
(batched: ``log_w`` ``(..., N)`` gives ``(..., n)``, one resampling per row)
with ``E[#copies of i] = n W_i`` (Douc, Cappé & Moulines 2005): :func:`multinomial`,
:func:`stratified`, :func:`systematic`, :func:`residual`.

Collapse policy: ``NaN`` incremental weights (e.g. a particle whose state blew up)
count as ``-inf`` (weight zero); weights are never NaN. When *every* weight is zero
:func:`normalize` / :func:`reweight` raise :class:`WeightCollapse`; callers that must
keep going (the particle filter) catch it, keep their previous weights and report
``collapsed`` in their info.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.rng import rand

__all__ = [
    "RESAMPLERS",
    "SMC",
    "WeightCollapse",
    "ess",
    "get_resampler",
    "local_systematic",
    "maybe_resample",
    "multinomial",
    "normalize",
    "residual",
    "reweight",
    "stratified",
    "systematic",
]


class WeightCollapse(RuntimeError):
    """Every importance weight is zero (all log-weights ``-inf`` or NaN)."""


def _clean(log_w: Tensor) -> Tensor:
    return torch.nan_to_num(log_w, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def normalize(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_w - logsumexp(log_w), logsumexp(log_w))``; NaN counts as ``-inf``.

    Raises :class:`WeightCollapse` when no weight is positive or one is ``+inf``."""
    log_w = _clean(log_w)
    lse = torch.logsumexp(log_w, dim=-1)
    if not bool(torch.isfinite(lse).all()):
        bad = int((~torch.isfinite(lse)).sum())
        raise WeightCollapse(
            f"importance weights collapsed: every weight is zero (or one infinite) in {bad} "
            f"of {lse.numel()} weight vector(s) of {log_w.shape[-1]} particles"
        )
    return log_w - lse.unsqueeze(-1), lse


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` of (unnormalised) log-weights;
    0 when every weight is zero."""
    log_w = _clean(log_w)
    num = 2 * torch.logsumexp(log_w, dim=-1)
    den = torch.logsumexp(2 * log_w, dim=-1)
    out = torch.exp(num - den)
    return torch.where(torch.isfinite(num), out, torch.zeros_like(out))


def reweight(log_w: Tensor, log_incr: Tensor) -> tuple[Tensor, Tensor]:
    """Multiply weights by ``G = exp(log_incr)``: returns the new normalised
    log-weights and the evidence increment ``log sum_i W_i G_i`` (``W = normalised
    log_w``)."""
    log_w, _ = normalize(log_w)
    return normalize(log_w + _clean(log_incr))


def _weights(log_w: Tensor) -> Tensor:
    w = normalize(log_w)[0].double().exp()
    return w / w.sum(-1, keepdim=True)


def _inverse_cdf(w: Tensor, u: Tensor) -> Tensor:
    """Indices ``i`` with ``C_{i-1} <= u < C_i`` for the cumulative weights ``C`` of
    ``w`` ``(..., N)``; ``u`` ``(..., n)`` in ``[0, 1)``."""
    c = torch.cumsum(w, -1)
    c = c / c[..., -1:]
    idx = torch.searchsorted(c, u.contiguous(), right=True)
    return idx.clamp_max(w.shape[-1] - 1)


def _u(w: Tensor, n: int, generator, shift: str) -> Tensor:
    batch = w.shape[:-1]
    if shift == "iid":
        return rand((*batch, n), generator, device=w.device, dtype=w.dtype)
    j = torch.arange(n, device=w.device, dtype=w.dtype)
    k = n if shift == "stratified" else 1
    return (j + rand((*batch, k), generator, device=w.device, dtype=w.dtype)) / n


def multinomial(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` i.i.d. draws from the categorical distribution ``W``."""
    w = _weights(log_w)
    return _inverse_cdf(w, _u(w, n, generator, "iid"))


def stratified(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """One uniform in each stratum ``[j/n, (j+1)/n)``."""
    w = _weights(log_w)
    return _inverse_cdf(w, _u(w, n, generator, "stratified"))


def systematic(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """A single uniform shifted through the strata: ``u_j = (j + U) / n``."""
    w = _weights(log_w)
    return _inverse_cdf(w, _u(w, n, generator, "systematic"))


def local_systematic(log_w: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling of every row of ``log_w`` ``(L, N)`` with one *shared*
    uniform ``u`` (a tensor with one element): ancestors ``(L, N)``, row ``l`` drawn at
    ``(j + u) / N``, ``j = 0..N-1``. Row by row this is exactly :func:`systematic` given
    that uniform; sharing it makes neighbouring grid points with similar weights pick the
    same ancestors (local particle filters: Poterjoy 2016; Farchi & Bocquet 2018)."""
    w = _weights(log_w)
    n = w.shape[-1]
    u = torch.as_tensor(u, device=w.device, dtype=w.dtype).reshape(1)
    pos = (torch.arange(n, device=w.device, dtype=w.dtype) + u) / n
    return _inverse_cdf(w, pos.expand(*w.shape[:-1], n))


def residual(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``floor(n W_i)`` deterministic copies, the other ``n - sum floor(n W_i)`` drawn
    multinomially from the residuals ``n W_i - floor(n W_i)`` (Liu & Chen 1998)."""
    w = _weights(log_w)
    counts = torch.floor(n * w)
    n_det = counts.sum(-1, keepdim=True)
    j = torch.arange(n, device=w.device, dtype=w.dtype).expand(*w.shape[:-1], n)
    # position j < n_det: the particle whose cumulative count first exceeds j
    det = torch.searchsorted(torch.cumsum(counts, -1), j.contiguous(), right=True)
    r = (n * w - counts).clamp_min(0)
    r = torch.where(r.sum(-1, keepdim=True) > 0, r, torch.ones_like(r))
    extra = _inverse_cdf(r, _u(w, n, generator, "iid"))
    return torch.where(j < n_det, det.clamp_max(w.shape[-1] - 1), extra)


RESAMPLERS: dict[str, Callable[..., Tensor]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name: str) -> Callable[..., Tensor]:
    """The resampling function called ``name``."""
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise InputError(
            f"unknown resampling scheme {name!r}; expected one of {sorted(RESAMPLERS)}"
        ) from None


def maybe_resample(
    x: Any,
    log_w: Tensor,
    threshold: float = 0.5,
    scheme: str | Callable[..., Tensor] = "systematic",
    generator: torch.Generator | None = None,
) -> tuple[Any, Tensor, bool]:
    """Resample when ``ESS < threshold * N`` (``threshold >= 1``: always; ``0``: never).

    ``x`` is a tensor ``(N, ...)`` or any object with an ``x`` tensor attribute and a
    ``log_w`` (an :class:`~assim.filters.base.Ensemble`); it is indexed by the drawn
    ancestors. Returns ``(x, log_w, resampled)``; after resampling ``log_w = -log N``.
    """
    n = log_w.shape[0]
    if not (threshold >= 1 or float(ess(log_w)) < threshold * n):
        return x, normalize(log_w)[0], False
    fn = get_resampler(scheme) if isinstance(scheme, str) else scheme
    idx = fn(log_w, n, generator)
    new_log_w = torch.full_like(log_w, -math.log(n))
    if torch.is_tensor(x):
        return x[idx.to(x.device)], new_log_w, True
    out = type(x)(x.x[idx.to(x.x.device)], new_log_w)
    return out, new_log_w, True


@dataclass
class SMC:
    """A particle system with a running log-evidence ``log_z``.

    ``x`` ``(N, *S)``, ``log_w`` ``(N,)`` normalised. ``reweight`` multiplies the
    weights by an incremental weight and accumulates ``log_z``; ``resample`` applies
    :func:`maybe_resample`. A model move (``x = propagate(x)``) is the caller's.
    """

    x: Tensor
    log_w: Tensor
    log_z: float = 0.0
    threshold: float = 0.5
    scheme: str = "systematic"

    @classmethod
    def uniform(cls, x: Tensor, **kw: Any) -> SMC:
        n = x.shape[0]
        return cls(x, torch.full((n,), -math.log(n), dtype=x.dtype, device=x.device), **kw)

    def reweight(self, log_incr: Tensor) -> float:
        self.log_w, inc = reweight(self.log_w, log_incr)
        self.log_z += float(inc)
        return float(inc)

    def resample(self, generator: torch.Generator | None = None) -> bool:
        self.x, self.log_w, done = maybe_resample(
            self.x, self.log_w, self.threshold, self.scheme, generator
        )
        return done

    @property
    def ess(self) -> float:
        return float(ess(self.log_w))
