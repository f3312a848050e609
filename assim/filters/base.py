"""The filter contract (DESIGN.md §2).

A cycle maps the analysis ensemble at physical step ``k`` and the observation
``y_{k+1}`` to the analysis at ``k + 1``. Classical filters forecast with
``world.step`` and then call ``analysis``; the diffusion particle filter fuses
both (its proposal *is* the guided world step), so the runner calls ``cycle``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Ensemble:
    """Particles ``x`` ``(N, *S)`` with normalised log-weights ``log_w`` ``(N,)``
    (``logsumexp(log_w) == 0``). Equal weights for ensemble Kalman methods."""

    x: Tensor
    log_w: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.log_w is None:
            n = self.x.shape[0]
            self.log_w = torch.full((n,), -math.log(n), dtype=self.x.dtype, device=self.x.device)

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def weights(self) -> Tensor:
        return self.log_w.exp()

    def mean(self) -> Tensor:
        w = self.weights().reshape(-1, *([1] * (self.x.dim() - 1)))
        return (w * self.x).sum(0)

    def var(self) -> Tensor:
        """Weighted variance per element (unbiased ``N/(N-1)`` for equal weights)."""
        w = self.weights().reshape(-1, *([1] * (self.x.dim() - 1)))
        m = (w * self.x).sum(0)
        v = (w * (self.x - m) ** 2).sum(0)
        n_eff = 1.0 / (self.weights() ** 2).sum()
        return v * n_eff / (n_eff - 1).clamp_min(1e-12)


class Filter:
    """Base class. Subclasses implement ``analysis``; the diffusion filter overrides
    ``cycle``. ``info`` holds at least ``ess`` (after the update, before any
    resampling), ``log_z`` (the evidence increment ``log p(y_{k+1} | y_{1:k})`` when
    the method has one, else NaN) and ``inflation``."""

    name: str = "filter"

    def analysis(
        self,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        raise NotImplementedError

    def cycle(
        self,
        world: Any,
        ensemble: Ensemble,
        y: Tensor | None,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Forecast every member one physical step, then assimilate ``y`` (``None`` or
        all-NaN: forecast only, recorded with ``info["skipped"] = True``)."""
        x = world.step(ensemble.x, generator=generator)
        forecast = Ensemble(x, ensemble.log_w)
        if y is None or bool(torch.isnan(y).all()):
            return forecast, {
                "ess": float(1.0 / (forecast.weights() ** 2).sum()),
                "log_z": 0.0,
                "inflation": 1.0,
                "skipped": True,
            }
        ens, info = self.analysis(forecast, y, obs, generator=generator)
        info.setdefault("skipped", False)
        return ens, info
