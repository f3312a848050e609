"""Look-ahead window filter with a data-driven mixture weight and an optional deflation.

:class:`AdaptiveMixLookahead` wraps a :class:`~assim.lookahead.LookaheadPF` with the
heavy-tailed model error ``(1 - a_k) K_q + a_k K_{kappa q}`` and sets the mixture weight
``a_k`` of window ``k`` from the past only:

    a_k = min(a_max, max(a_min, r_{k-1})),   a_1 = a_min,
    r_{k-1} = P(wide component in window k-1 | y_{1:k-1})
            ~ sum_i W_i (a_{k-1} N(x_i; m_i, kappa^2 V_i)) / p(x_i)

(``r`` from the filter's own weighted particles, ``info["wide_prob"]`` of
:meth:`LookaheadPF.window`). Read as a regime model: the posterior probability that the
previous window needed the wide model error becomes the prior probability of the next,
floored at ``a_min`` (so a calm filter keeps only a small heavy tail, which is what
over-disperses the fixed mixture) and capped at ``a_max``. Because ``a_k`` depends on
``y_{1:k-1}`` only, the model of window ``k`` is fixed before ``y_k`` is seen, and the
incremental weights of :class:`LookaheadPF` stay exact for this data-dependent model (as
with the time-varying ``q`` schedule); ``a_min == a_max`` is the fixed mixture, bit for
bit (tested).

**Analysis deflation** (``spread_factor = beta`` in ``(0, 1]``, an *approximation*): after
each analysis (not after a weight collapse) the anomalies are scaled about the weighted
mean, ``x_i <- xbar + beta (x_i - xbar)`` (:func:`~assim.filters.dpf_local.scale_anomalies`:
weighted mean unchanged, weighted variances times ``beta^2``). This is multiplicative
inflation with a factor ``< 1`` (Anderson & Anderson 1999, MWR 127), a calibration knob
for a filter whose variance is inflated by a few far-out particles (the defensive mixture's
heavy tail). It shrinks the bulk and the tail alike, so it trades the flatness of the rank
histogram for spread/skill. With ``beta < 1`` the particles no longer target the window
model's posterior and ``log_z`` is the evidence of the deflated prior, not of the model;
``beta = 1`` is off (bit for bit).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.dpf_local import check_spread_factor, deflate_analysis
from assim.lookahead import LookaheadPF

__all__ = ["AdaptiveMixLookahead"]


class AdaptiveMixLookahead:
    """A :class:`LookaheadPF` whose mixture weight follows the previous window's
    posterior probability of the wide component (module doc), with an optional analysis
    deflation.

    Args:
        pf: the window filter (its ``q``, ``mix_scale``, proposal options are used; its
            ``mix`` is overwritten before every window).
        mix_min, mix_max: floor and cap of the mixture weight, ``0 < mix_min <= mix_max
            < 1`` (equal: the fixed mixture ``pf.mix = mix_min``).
        spread_factor: analysis deflation ``beta`` in ``(0, 1]`` (1: off; ``< 1`` is an
            approximation, module doc).

    State: ``mix`` (the weight the next window uses) and ``history`` (one ``mix`` per
    window); :meth:`reset` restores the start.
    """

    name = "lookahead-pf-adaptive-mix"

    def __init__(
        self, pf: LookaheadPF, mix_min: float, mix_max: float, spread_factor: float = 1.0
    ) -> None:
        if not isinstance(pf, LookaheadPF):
            raise InputError(f"pf must be a LookaheadPF, got {type(pf).__name__}")
        if not (0.0 < mix_min <= mix_max < 1.0):
            raise InputError(
                f"need 0 < mix_min <= mix_max < 1, got mix_min={mix_min!r}, mix_max={mix_max!r}"
            )
        self.pf, self.mix_min, self.mix_max = pf, float(mix_min), float(mix_max)
        self.spread_factor = check_spread_factor(spread_factor)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next window uses ``mix_min``."""
        self.mix = self.mix_min
        self.history: list[float] = []

    def __repr__(self) -> str:
        return (
            f"AdaptiveMixLookahead({self.pf!r}, mix_min={self.mix_min}, "
            f"mix_max={self.mix_max}, spread_factor={self.spread_factor})"
        )

    def next_mix(self, wide_prob: float) -> float:
        """``min(mix_max, max(mix_min, wide_prob))`` (a non-finite ``wide_prob``: the cap)."""
        if not math.isfinite(wide_prob):
            return self.mix_max
        return min(self.mix_max, max(self.mix_min, float(wide_prob)))

    @torch.no_grad()
    def window(
        self,
        flow: Any,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """One window of :meth:`LookaheadPF.window` with ``mix = self.mix``; then the
        weight of the next window from this window's ``wide_prob`` and, if
        ``spread_factor < 1``, the deflated analysis ``(N, *S)``. ``info`` adds ``mix``
        (the weight used) and ``mix_next``."""
        self.pf.mix = self.mix
        ens, info = self.pf.window(flow, ensemble, y, obs, steps, generator)
        info["mix"] = self.mix
        self.history.append(self.mix)
        self.mix = self.next_mix(info.get("wide_prob", self.mix))  # no data: prior = posterior
        info["mix_next"] = self.mix
        return deflate_analysis(ens, info, self.spread_factor), info
