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

    def _coefficients(self, x: Tensor) -> Tensor:
        """``(3, 6)`` matrix ``C`` with ``x @ C = [L x | P x]``: the linear part
        ``L x = (σ(y − x), ρx − y, −βz)`` and ``P x = (0, −z, y)``, so that
        ``f(x) = L x + x · P x`` (cached per dtype/device)."""
        key = (x.dtype, x.device)
        if getattr(self, "_coef_key", None) != key:
            s, r, b = self.sigma, self.rho, self.beta
            rows = [[-s, s, 0.0], [r, -1.0, 0.0], [0.0, 0.0, -b], [0, 0, 0], [0, 0, -1], [0, 1, 0]]
            self._coef = torch.tensor(rows, dtype=x.dtype, device=x.device).T.contiguous()
            self._coef_key = key
        return self._coef

    def tendency(self, x: Tensor) -> Tensor:
        """Right-hand side ``f(x)`` of shape ``(N, 3)``: one matmul and one fused
        multiply-add (``L x + x₁ · P x``) instead of a dozen small operations."""
        lp = x @ self._coefficients(x)
        return torch.addcmul(lp[..., :3], x[..., :1], lp[..., 3:])

    def random_state(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """``(n, 3)`` initial states ``(1, 1, 1) + N(0, 1)``; spin up before use."""
        return randn_on((n, 3), generator, dtype, device) + 1.0
