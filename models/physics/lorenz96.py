"""Lorenz-96 (Lorenz 1996, "Predictability — a problem partly solved"), batched.

``dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F`` on a periodic ring of ``n``
variables; batches ``(N, n)``. With ``n = 40``, ``F = 8`` the attractor has
time-mean ≈ 2.34 and standard deviation ≈ 3.63 per variable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.physics.base import Simulator, randn_on


class Lorenz96(Simulator):
    """Lorenz-96 with RK4; ``default_dt = 0.05`` (DAPPER / BENCHMARKS.md)."""

    default_dt = 0.05

    def __init__(self, n: int = 40, F: float = 8.0):
        if n < 4:
            raise ValueError(f"Lorenz96: n must be >= 4, got {n}")
        self.n, self.F = int(n), float(F)
        self.state_shape = (self.n,)

    @staticmethod
    def advection(x: Tensor) -> Tensor:
        """The quadratic term ``(x_{i+1} − x_{i−2}) x_{i−1}``, ``(N, n)``.

        It conserves energy: ``Σ_i x_i · adv_i = 0`` identically.
        """
        return (torch.roll(x, -1, dims=-1) - torch.roll(x, 2, dims=-1)) * torch.roll(x, 1, dims=-1)

    def tendency(self, x: Tensor) -> Tensor:
        """Right-hand side ``adv(x) − x + F``, shape ``(N, n)``."""
        return self.advection(x) - x + self.F

    def random_state(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """``(n, self.n)`` initial states ``F + N(0, 1)``; spin up before use."""
        return randn_on((n, self.n), generator, dtype, device) + self.F
