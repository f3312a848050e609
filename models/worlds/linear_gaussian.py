"""A linear-Gaussian world ``x_{k+1} = A x_k + b + N(0, Q)``: the exactness oracle.

With a linear Gaussian observation the Kalman filter is exact for this world, so
particle filters (bootstrap and diffusion) are tested against it (BENCHMARKS.md C).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.worlds.base import rollout


def _sqrt_psd(Q: Tensor) -> Tensor:
    """A square root ``L`` with ``L L^T = Q`` (Cholesky; symmetric eigen-root when
    ``Q`` is only semi-definite, e.g. noise-free directions)."""
    L, info = torch.linalg.cholesky_ex(Q)
    if int(info) == 0:
        return L
    evals, evecs = torch.linalg.eigh(Q)
    if float(evals.min()) < -1e-10 * max(1.0, float(evals.abs().max())):
        raise ValueError(
            f"LinearGaussian: Q is not positive semi-definite (eigenvalue {float(evals.min()):.3g})"
        )
    return evecs * evals.clamp_min(0).sqrt()


class LinearGaussian:
    """World ``x_{k+1} = A x_k + b + w_k``, ``w_k ~ N(0, Q)``, state ``(d,)``.

    ``A`` ``(d, d)``, ``b`` ``(d,)`` or None, ``Q`` ``(d, d)`` (positive semi-definite).
    Tensors follow the input's device and dtype.
    """

    def __init__(self, A: Tensor, b: Tensor | None, Q: Tensor, dt: float = 1.0) -> None:
        A = torch.as_tensor(A, dtype=torch.float64)
        Q = torch.as_tensor(Q, dtype=torch.float64)
        d = A.shape[0]
        if A.shape != (d, d) or Q.shape != (d, d):
            raise ValueError(
                f"LinearGaussian: A and Q must be (d, d), got {tuple(A.shape)} and {tuple(Q.shape)}"
            )
        b = (
            torch.zeros(d, dtype=torch.float64)
            if b is None
            else torch.as_tensor(b, dtype=torch.float64).reshape(d)
        )
        self.A, self.b, self.Q = A, b, Q
        self.Q_sqrt = _sqrt_psd(Q)
        self.state_shape = (d,)
        self.dt = float(dt)

    def mean_step(self, x: Tensor) -> Tensor:
        """``A x + b`` for a batch ``(N, d)``."""
        A, b = self.A.to(x.device, x.dtype), self.b.to(x.device, x.dtype)
        return x @ A.T + b

    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One step of a batch ``(N, d) -> (N, d)``."""
        if x.dim() < 2 or x.shape[-1] != self.state_shape[0]:
            raise ValueError(
                f"LinearGaussian.step: x must have shape (N, ..., {self.state_shape[0]}), "
                f"got {tuple(x.shape)}"
            )
        where = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, device=where, dtype=x.dtype).to(x.device)
        return self.mean_step(x) + eps @ self.Q_sqrt.to(x.device, x.dtype).T

    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(members, n_steps, d)`` from ``x0`` ``(d,)`` (replicated) or ``(members, d)``."""
        return rollout(self, x0, n_steps, members, generator)

    # The exact diffusion chain of this model is models.worlds.diffusion_lg.
