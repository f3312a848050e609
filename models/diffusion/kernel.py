"""The Gaussian transition kernel that every sampler step exposes.

SMC needs ``log p(x_s | x_t)`` of each stochastic step and guided proposals need
to shift its mean, so samplers return a :class:`GaussianKernel` instead of a
sample. A deterministic (ODE) step has ``var == 0``: sampling returns the mean,
and asking for a density raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianKernel:
    """Diagonal Gaussian ``N(mean, var)`` of one step, shape ``(N, *S)``.

    ``var`` broadcasts against ``mean`` (a scalar tensor, per-particle ``(N, 1, ...)``
    or per-element). ``log_prob`` sums over all non-leading dimensions.
    """

    mean: Tensor
    var: Tensor

    @property
    def deterministic(self) -> bool:
        return bool(torch.all(self.var == 0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``mean + sqrt(var) * eps``; the mean itself when deterministic."""
        if self.deterministic:
            return self.mean.clone()
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.var.sqrt() * eps

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mean, var)`` summed over ``*S``, shape ``(N,)``.

        Raises ``ValueError`` for a zero-variance (ODE) step, whose density does not exist.
        """
        if torch.any(self.var <= 0):
            raise ValueError(
                "log_prob of a deterministic (ODE, var = 0) transition is undefined; "
                "use a stochastic sampler (DDPM, DDIM with eta > 0, Euler-Maruyama) for SMC"
            )
        var = self.var.expand_as(self.mean)
        lp = -0.5 * ((x - self.mean) ** 2 / var + torch.log(2 * math.pi * var))
        return lp.flatten(1).sum(1)

    def to(self, *args, **kwargs) -> GaussianKernel:
        return GaussianKernel(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs))
