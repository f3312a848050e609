"""The world-model protocol (DESIGN.md §2).

A world model is a stochastic transition of a dynamical system on a grid.
Shapes: particles/members first, ``(N, *S)`` where ``S = world.state_shape``.

Every world implements :class:`World`. Diffusion worlds additionally implement
:class:`DiffusionWorld`: ``transition_sampler(cond)`` returns the diffusion chain
of one physical step *in state space*, so that ``assim`` can guide and weight it
without knowing how the world normalises its data.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from models.diffusion.kernel import GaussianKernel


@runtime_checkable
class World(Protocol):
    """A stochastic (or deterministic) one-step transition ``x_k -> x_{k+1}``."""

    state_shape: tuple[int, ...]
    dt: float  # physical time between two steps

    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One physical step of a batch ``(N, *S) -> (N, *S)``."""
        ...

    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ensemble forecast. ``x0`` is ``(*S)`` (replicated) or ``(members, *S)``.

        Returns ``(members, n_steps, *S)``: states after 1..n_steps steps.
        """
        ...


@runtime_checkable
class TransitionChain(Protocol):
    """The diffusion chain of one physical step, conditioned on the current particles.

    Diffusion times ``times`` decrease, ``times[0] = t_J`` (pure noise side) to
    ``times[-1] = t_0``; ``t_0 > 0`` when the chain stops at a model-error noise
    level ``q`` (the final sample is the learned step plus ``N(0, q^2)``).
    All tensors are in *state space* (physical units), shape ``(N, *S)``.
    """

    times: Tensor

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_{t_J}`` for every particle."""
        ...

    def kernel(self, x_t: Tensor, j: int) -> GaussianKernel:
        """Gaussian kernel of the step ``times[j] -> times[j + 1]`` given ``x_t``."""
        ...

    def denoise(self, x_t: Tensor, j: int) -> Tensor:
        """``E[x_{k+1} | x_{t_j}, cond]`` in state space (Tweedie)."""
        ...

    def denoise_var(self, j: int) -> Tensor:
        """Variance (broadcastable to ``(N, *S)``) of ``x_{k+1}`` around ``denoise``,
        for twists ``p(y | x_t) ≈ N(y; H denoise, R + H diag(var) H^T)``.
        At the last index it is the model-error variance ``q^2``."""
        ...


@runtime_checkable
class DiffusionWorld(World, Protocol):
    def transition_sampler(self, cond: Tensor) -> TransitionChain:
        """The chain of one physical step from the particles ``cond`` ``(N, *S)``."""
        ...


def rollout(
    world: World,
    x0: Tensor,
    n_steps: int,
    members: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Autoregressive ensemble forecast by repeated ``world.step``, shared by worlds whose
    ``forecast`` is nothing more.

    ``x0`` is ``(*S)`` (replicated to ``members``) or ``(members, *S)``; returns
    ``(members, n_steps, *S)``, the states after steps ``1..n_steps``.
    """
    shape = tuple(world.state_shape)
    name = type(world).__name__
    if tuple(x0.shape) == shape:
        x = x0.unsqueeze(0).expand(members, *shape).clone()
    elif tuple(x0.shape) == (members, *shape):
        x = x0
    else:
        raise ValueError(
            f"{name}.forecast: x0 must be {shape} or "
            f"({members}, {', '.join(map(str, shape))}), got {tuple(x0.shape)}"
        )
    out = torch.empty((members, n_steps, *shape), dtype=x.dtype, device=x.device)
    for k in range(n_steps):
        x = world.step(x, generator)
        out[:, k] = x
    return out
