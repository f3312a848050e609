"""``Physical``: a simulator plus additive Gaussian model-error noise (the true-model
baseline world of DESIGN.md §2).

One world step of length ``dt`` runs ``n_substeps`` simulator steps of
``dt / n_substeps`` and adds ``noise_std · ε``, ``ε ~ N(0, I)``:
``x_{k+1} = M(x_k) + η_k``, ``η_k ~ N(0, noise_std²)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.physics import Kolmogorov, Lorenz63, Lorenz96, Simulator
from models.worlds.base import rollout

# BENCHMARKS.md: L96 RK4 dt = 0.05, L63 dt = 0.01; Kolmogorov snapshots every 0.2 time
# units (as in SDA), integrated with 20 internal steps of 0.01.
_DEFAULTS: dict[str, tuple[type[Simulator], dict[str, float]]] = {
    "l63": (Lorenz63, {"dt": 0.01, "n_substeps": 1}),
    "l96": (Lorenz96, {"dt": 0.05, "n_substeps": 1}),
    "kolmogorov": (Kolmogorov, {"dt": 0.2, "n_substeps": 20}),
}


class Physical:
    """World wrapper around a :class:`~models.physics.Simulator`.

    ``noise_std`` is a float or a tensor broadcastable to ``state_shape``.
    """

    def __init__(
        self,
        simulator: Simulator,
        dt: float,
        n_substeps: int = 1,
        noise_std: float | Tensor = 0.0,
    ):
        if dt <= 0 or n_substeps < 1:
            raise ValueError(f"Physical: need dt > 0 and n_substeps >= 1, got {dt}, {n_substeps}")
        self.simulator = simulator
        self.state_shape: tuple[int, ...] = tuple(simulator.state_shape)
        self.dt = float(dt)
        self.n_substeps = int(n_substeps)
        self.noise_std = noise_std

    def __repr__(self) -> str:
        return (
            f"Physical({type(self.simulator).__name__}, dt={self.dt}, "
            f"n_substeps={self.n_substeps}, noise_std={self.noise_std})"
        )

    def to(self, *args: object, **kwargs: object) -> Physical:
        """No-op (simulators take their device from the input); for ``nn.Module`` parity."""
        return self

    def _noise(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        dev = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
        std = self.noise_std
        if isinstance(std, Tensor):
            std = std.to(device=x.device, dtype=x.dtype)
        return std * eps

    def deterministic_step(self, x: Tensor) -> Tensor:
        """The noise-free step ``M(x)``, ``(N, *S) -> (N, *S)``."""
        h = self.dt / self.n_substeps
        for _ in range(self.n_substeps):
            x = self.simulator.step(x, h)
        return x

    @torch.no_grad()
    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One world step ``(N, *S) -> (N, *S)``: ``M(x) + noise_std · ε``."""
        if tuple(x.shape[1:]) != self.state_shape:
            raise ValueError(
                f"Physical.step: expected (N, {', '.join(map(str, self.state_shape))}), "
                f"got {tuple(x.shape)}"
            )
        x = self.deterministic_step(x)
        if isinstance(self.noise_std, Tensor) or self.noise_std != 0.0:
            x = x + self._noise(x, generator)
        return x

    @torch.no_grad()
    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ensemble forecast: ``x0`` ``(*S)`` (replicated) or ``(members, *S)``.

        Returns ``(members, n_steps, *S)``, the states after steps ``1..n_steps``.
        """
        return rollout(self, x0, n_steps, members, generator)


def physical_world(spec: str, **kw: object) -> Physical:
    """Build a :class:`Physical` world from ``"l63"``, ``"l96"``, ``"kolmogorov"``
    (``"physical:"`` prefix accepted). Keywords ``dt``, ``n_substeps``, ``noise_std``
    go to the world, all others to the simulator (e.g. ``n=40, F=8.0``)."""
    name = spec.strip().lower().removeprefix("physical:")
    if name not in _DEFAULTS:
        raise ValueError(f"physical_world: unknown system {spec!r}; known: {sorted(_DEFAULTS)}")
    cls, defaults = _DEFAULTS[name]
    world_kw = {k: kw.pop(k, v) for k, v in defaults.items()}
    noise_std = kw.pop("noise_std", 0.0)
    try:
        sim = cls(**kw)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"physical_world({spec!r}): bad simulator parameter: {exc}") from exc
    return Physical(sim, float(world_kw["dt"]), int(world_kw["n_substeps"]), noise_std)  # type: ignore[arg-type]
