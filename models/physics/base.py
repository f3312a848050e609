"""Shared time stepping for the physical simulators.

Every simulator maps a batch ``x`` of shape ``(N, *S)`` (members first) to a
batch of the same shape; dtype and device come from ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def rk4_step(f: Callable[[Tensor], Tensor], x: Tensor, dt: float) -> Tensor:
    """One classical fourth-order Runge–Kutta step of ``dx/dt = f(x)``.

    ``x_{k+1} = x_k + dt/6 (k1 + 2 k2 + 2 k3 + k4)`` with the usual stages
    (Butcher 2008, §23). Shape-preserving: ``(N, *S) -> (N, *S)``.
    """
    # torch.add(a, b, alpha=c) = a + c·b in one kernel: small systems (L63, N = 10) are
    # dominated by per-operation overhead, so fewer operations is most of the speed.
    k1 = f(x)
    k2 = f(torch.add(x, k1, alpha=0.5 * dt))
    k3 = f(torch.add(x, k2, alpha=0.5 * dt))
    k4 = f(torch.add(x, k3, alpha=dt))
    incr = torch.add(torch.add(k1, k4), torch.add(k2, k3), alpha=2.0)
    return torch.add(x, incr, alpha=dt / 6.0)


def randn_on(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Tensor:
    """Standard normal draws of ``shape`` made on the generator's device (so a CPU
    generator gives the same numbers for a CUDA run) and moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=dtype, device=gdev).to(device)


class Simulator:
    """Base class: subclasses define ``state_shape`` and ``step(x, dt)``."""

    state_shape: tuple[int, ...]
    default_dt: float

    def tendency(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Right-hand side ``f(x)`` of ``dx/dt = f(x)``, shape ``(N, *S)``."""
        raise NotImplementedError

    def step(self, x: Tensor, dt: float | None = None) -> Tensor:
        """One classical RK4 step of :meth:`tendency` (:func:`rk4_step`), ``(N, *S) ->
        (N, *S)``; ``dt`` defaults to ``default_dt``. Stiff models override it."""
        return rk4_step(self.tendency, x, self.default_dt if dt is None else dt)

    def _check(self, x: Tensor) -> None:
        n = len(self.state_shape)
        if x.dim() != n + 1 or tuple(x.shape[1:]) != tuple(self.state_shape):
            raise ValueError(
                f"{type(self).__name__}: expected a batch of shape (N, "
                f"{', '.join(map(str, self.state_shape))}), got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def integrate(
        self, x0: Tensor, n_steps: int, dt: float | None = None, spinup: int = 0
    ) -> Tensor:
        """Run ``spinup`` discarded steps, then return ``(n_steps, N, *S)``: the
        states after steps ``1..n_steps`` (the initial state is not included)."""
        dt = self.default_dt if dt is None else float(dt)
        if n_steps < 0 or spinup < 0:
            raise ValueError(f"n_steps and spinup must be >= 0, got {n_steps}, {spinup}")
        self._check(x0)
        x = x0
        for _ in range(spinup):
            x = self.step(x, dt)
        out = torch.empty((n_steps, *x0.shape), dtype=x0.dtype, device=x0.device)
        for k in range(n_steps):
            x = self.step(x, dt)
            out[k] = x
        return out
