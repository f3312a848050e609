"""DYffusion (Cachay et al., NeurIPS 2023, "DYffusion: a dynamics-informed diffusion
model for spatiotemporal forecasting"): physical time is the diffusion axis.

Two networks on normalised states ``z = (x - m) / s`` over a horizon of ``h`` data steps:

* interpolator ``I(z_k, z_{k+h}, i) ≈ z_{k+i}``, ``i in {0, .., h}``: a linear
  interpolation plus a learned correction (trained at the endpoints too, so that
  ``I(., ., 0) ≈ z_k`` and ``I(., ., h) ≈ z_{k+h}`` are *learned*, not imposed);
* forecaster ``F(z_{k+i}, i) ≈ z_{k+h}`` (the "denoiser": it maps the state at
  intermediate time ``k+i`` to the horizon), trained on interpolated inputs
  ``I(z_k, z_{k+h}, i)`` (``i = 0``: ``z_k`` itself), as in the paper's Algorithm 1.

The paper trains ``I`` first and then ``F`` with ``I`` frozen; here both losses are
summed in one run with the interpolator output detached for ``F`` (same fixed
point, one training command).

**Sampling** (paper Algorithm 2, cold sampling of Bansal et al. 2022): from
``z_{k+i_n}`` with ``x̂ = F(z_{k+i_n}, i_n)``,

    z_{k+i_{n+1}} = z_{k+i_n} + I(z_k, x̂, i_{n+1}) - I(z_k, x̂, i_n),

walking ``i = 0, 1, .., h``, so a forecast exists at every intermediate time. The paper
gets stochasticity from MC dropout; to give SMC a density each step is instead a
Gaussian kernel ``N(mean above, v_n s^2)`` whose variance ``v_n`` is calibrated after
training (:meth:`DYffusion.calibrate`: the mean squared one-step residual on held-out
windows) or fixed (``kernel_var``).

**Chain in state space.** One world step covers the horizon: ``world.dt = h * dt``.
``transition_sampler(x_k).times[j] = 1 - j / h`` (decreasing) indexes physical
intermediate time ``k + j``; the chain state at index ``j`` is the forecast ``x_{k+j}``,
``init`` returns ``x_k`` (no noise: the first kernel is the first stochastic step),
``denoise(x, j) = F`` mapped to state space (``E[x_{k+h} | x_{k+j}]``) and
``denoise_var(j)`` the forecaster's held-out MSE at lead ``j`` (``0`` at ``j = h``).
:meth:`DYffusion.forecast_path` returns every intermediate state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.diffusion.kernel import GaussianKernel
from models.worlds._multistep import SpecWorld, make_backbone


@dataclass(frozen=True)
class DYffusionSpec:
    """Plain-data description of a :class:`DYffusion` world (stored in checkpoints)."""

    state_shape: tuple[int, ...]
    dt: float  # data step; the world steps h * dt
    horizon: int = 4
    backbone: str = "auto"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    kernel_var: float = 1e-3  # normalised kernel variance before calibration
    variable: str = "x"
    dims: tuple[str, ...] = ("x",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))
        object.__setattr__(self, "dims", tuple(str(d) for d in self.dims))
        if self.horizon < 1:
            raise ValueError(f"DYffusion: horizon must be >= 1, got {self.horizon}")
        if self.kernel_var <= 0:
            raise ValueError(f"DYffusion: kernel_var must be > 0, got {self.kernel_var}")
        if len(self.dims) != len(self.state_shape):
            raise ValueError(f"dims {self.dims} do not match state_shape {self.state_shape}")


class DYffusion(SpecWorld):
    """DYffusion world (``World`` + ``DiffusionWorld``); one step = ``horizon`` data steps."""

    kind = "dyffusion"
    spec_cls = DYffusionSpec
    window_key = "horizon"

    def __init__(self, spec: DYffusionSpec) -> None:
        super().__init__(spec)
        self.horizon = h = spec.horizon
        self.dt = float(spec.dt) * h
        kw = dict(spec.backbone_kwargs)
        shape = spec.state_shape
        self.denoiser = nn.ModuleDict(
            {
                "interpolator": make_backbone(spec.backbone, shape, 1, 2, **kw),
                "forecaster": make_backbone(spec.backbone, shape, 1, 0, **kw),
            }
        )
        self.register_buffer("kernel_var", torch.full((h,), float(spec.kernel_var)))
        self.register_buffer("fcst_mse", torch.full((h,), float("nan")))

    # ------------------------------------------------------------------ networks
    def _lead(self, i: Tensor | int, z: Tensor) -> Tensor:
        return torch.as_tensor(i, device=z.device, dtype=z.dtype).expand(z.shape[0])

    def interpolate(self, z0: Tensor, zh: Tensor, i: Tensor | int) -> Tensor:
        """``I(z_k, z_{k+h}, i)`` ``(B, *S)`` for lead ``i`` (int or ``(B,)``)."""
        frac = self._lead(i, z0) / self.horizon
        f = frac.reshape(-1, *([1] * (z0.dim() - 1)))
        lin = (1 - f) * z0 + f * zh
        net = self.denoiser["interpolator"]
        return lin + net(lin, frac, torch.stack([z0, zh], 1))

    def forecaster(self, z: Tensor, i: Tensor | int) -> Tensor:
        """``F(z_{k+i}, i) ≈ z_{k+h}``, shape ``(B, *S)``."""
        return z + self.denoiser["forecaster"](z, self._lead(i, z) / self.horizon, None)

    def cold_step(self, z0: Tensor, z: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """``(mean of z_{k+j+1}, x̂ = F(z, j))`` of the cold-sampling step from lead ``j``."""
        xh = self.forecaster(z, j)
        return z + self.interpolate(z0, xh, j + 1) - self.interpolate(z0, xh, j), xh

    # ------------------------------------------------------------------ training
    def training_loss(
        self, history: Tensor, nxt: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """``E||I(z_k, z_{k+h}, i) - z_{k+i}||^2 + E||F(Ĩ_j, j) - z_{k+h}||^2`` per element,
        ``i ~ U{0..h}``, ``j ~ U{0..h-1}``, ``Ĩ_j`` the detached interpolation
        (``z_k`` at ``j = 0``). ``history`` ``(B, h, *S)``, ``nxt`` ``(B, *S)``."""
        w = self.encode(self.window(history, nxt))
        if w.shape[1] != self.horizon + 1:
            raise ValueError(
                f"DYffusion(horizon={self.horizon}) needs windows of {self.horizon + 1} states, "
                f"got {w.shape[1]} (train with history = horizon)"
            )
        b, h, dev = w.shape[0], self.horizon, w.device
        rows = torch.arange(b, device=dev)
        z0, zh = w[:, 0], w[:, h]
        i = torch.randint(0, h + 1, (b,), generator=generator, device=dev)
        loss_i = ((self.interpolate(z0, zh, i) - w[rows, i]) ** 2).mean()
        j = torch.randint(0, h, (b,), generator=generator, device=dev)
        with torch.no_grad():
            inp = self.interpolate(z0, zh, j)
        first = (j == 0).reshape(-1, *([1] * (z0.dim() - 1)))
        inp = torch.where(first, z0, inp)
        loss_f = ((self.forecaster(inp, j) - zh) ** 2).mean()
        return loss_i + loss_f

    @torch.no_grad()
    def calibrate(self, history: Tensor, nxt: Tensor, seed: int = 0) -> Tensor:
        """Set ``kernel_var[j]`` = held-out mean squared residual of the cold step from the
        true ``z_{k+j}`` and ``fcst_mse[j] = E||F(z_{k+j}, j) - z_{k+h}||^2 / dim``."""
        w = self.encode(self.window(history, nxt).to(self.state_mean))
        z0, zh = w[:, 0], w[:, self.horizon]
        for j in range(self.horizon):
            mean, xh = self.cold_step(z0, w[:, j], j)
            self.kernel_var[j] = ((w[:, j + 1] - mean) ** 2).mean().clamp_min(1e-8)
            self.fcst_mse[j] = ((xh - zh) ** 2).mean()
        return self.kernel_var

    # ------------------------------------------------------------------ protocol
    def transition_sampler(self, cond: Tensor) -> DYffusionChain:
        """The chain ``x_k -> x_{k+h}`` over intermediate times from particles ``(N, *S)``."""
        return DYffusionChain(self, self.check(cond))

    @torch.no_grad()
    def forecast_path(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Every intermediate state: ``(members, n_steps * h, *S)`` at data steps
        ``1 .. n_steps h`` (``forecast`` keeps every ``h``-th, with the same draws)."""
        if x0.dim() == len(self.state_shape):
            x0 = x0.unsqueeze(0).expand(members, *x0.shape)
        if x0.shape[0] != members:
            raise ValueError(f"x0 has {x0.shape[0]} members, members={members}")
        x, out = self.check(x0), []
        for _ in range(n_steps):
            path = DYffusionChain(self, x).run(generator, path=True)
            out.append(path)
            x = path[:, -1]
        if not out:
            return x.new_empty((members, 0, *self.state_shape))
        return torch.cat(out, 1)


class DYffusionChain:
    """One DYffusion step ``x_k -> x_{k+h}`` as a ``TransitionChain`` in state space."""

    def __init__(self, world: DYffusion, x_k: Tensor) -> None:
        self.world, self.x_k = world, x_k
        h = world.horizon
        self.times = 1.0 - torch.arange(h + 1, dtype=torch.float64, device=x_k.device) / h
        self.z0 = world.encode(x_k)
        self.s2 = world.state_std**2

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """The chain starts at the current state ``x_k`` (lead 0); nothing is drawn."""
        return self.x_k.clone()

    def kernel(self, x_t: Tensor, j: int) -> GaussianKernel:
        """``N(cold-sampling mean, s^2 v_j)`` of lead ``j -> j + 1`` in state units."""
        mean, _ = self.world.cold_step(self.z0, self.world.encode(x_t), j)
        return GaussianKernel(self.world.decode(mean), self.s2 * self.world.kernel_var[j])

    def denoise(self, x_t: Tensor, j: int) -> Tensor:
        """``E[x_{k+h} | x_{k+j}] ≈ F``; the state itself at ``j = h``."""
        if j in (self.world.horizon, -1):
            return x_t
        return self.world.decode(self.world.forecaster(self.world.encode(x_t), j))

    def denoise_var(self, j: int) -> Tensor:
        """``s^2 E||F(z_{k+j}) - z_{k+h}||^2`` (held-out; before calibration the sum of the
        remaining kernel variances); ``0`` at ``j = h``."""
        w, h = self.world, self.world.horizon
        if j in (h, -1):
            return torch.zeros_like(self.s2)
        v = w.fcst_mse[j]
        if torch.isnan(v):
            v = w.kernel_var[j:].sum()
        return self.s2 * torch.maximum(v, w.kernel_var[j:].sum())

    def run(self, generator: torch.Generator | None = None, path: bool = False) -> Tensor:
        """Sample the chain: ``x_{k+h}`` ``(N, *S)``, or with ``path`` every lead
        ``(N, h, *S)``."""
        x, out = self.init(generator), []
        for j in range(len(self.times) - 1):
            x = self.kernel(x, j).sample(generator)
            out.append(x)
        return torch.stack(out, 1) if path else x
