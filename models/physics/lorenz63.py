"""Lorenz-63 (Lorenz 1963, "Deterministic nonperiodic flow"), batched.

``dx/dt = σ (y − x)``, ``dy/dt = x (ρ − z) − y``, ``dz/dt = x y − β z``;
state shape ``(3,)``, batches ``(N, 3)``. Classical parameters σ=10, ρ=28,
β=8/3 give the butterfly attractor with leading Lyapunov exponent ≈ 0.906.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.physics.base import Simulator, randn_on


class Lorenz63(Simulator):
    """Lorenz-63 integrated with RK4; ``default_dt = 0.01`` (DAPPER's L63 setting)."""

    default_dt = 0.01

    def __init__(self, sigma: float = 10.0, rho: float = 28.0, beta: float = 8.0 / 3.0):
        self.sigma, self.rho, self.beta = float(sigma), float(rho), float(beta)
        self.state_shape = (3,)

    def tendency(self, x: Tensor) -> Tensor:
        """Right-hand side ``f(x)`` of shape ``(N, 3)``."""
        a, b, c = x[..., 0], x[..., 1], x[..., 2]
        return torch.stack(
            (self.sigma * (b - a), a * (self.rho - c) - b, a * b - self.beta * c), dim=-1
        )

    def random_state(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """``(n, 3)`` initial states ``(1, 1, 1) + N(0, 1)``; spin up before use."""
        return randn_on((n, 3), generator, dtype, device) + 1.0
