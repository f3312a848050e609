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
windows) or fixed (``kernel_var``). :meth:`DYffusion.set_var_scale` multiplies every kernel
variance by ``c`` at inference (``N(mean, c v_n s^2)``; default 1, not stored in the
checkpoint): a calibrated one-step variance need not give a calibrated ensemble at long
leads.

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
        self.var_scale = 1.0

    def set_var_scale(self, var_scale: float) -> DYffusion:
        """Set the inference-time scale ``c > 0`` of every kernel variance (``c v_j s^2``);
        returns ``self``. Deliberately not ``configure``: callers treat ``configure`` as
        "has a model-error level ``q`` / diffusion steps", which DYffusion has not (see
        :class:`DYffusionDataStep` for a ``q``)."""
        if not (var_scale > 0 and var_scale < float("inf")):
            raise ValueError(f"DYffusion: var_scale must be finite and > 0, got {var_scale}")
        self.var_scale = float(var_scale)
        return self

    def scaled_kernel_var(self) -> Tensor:
        """``c v_j`` ``(h,)``: the normalised kernel variances used at inference."""
        return self.var_scale * self.kernel_var

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
        """``N(cold-sampling mean, s^2 c v_j)`` of lead ``j -> j + 1`` in state units."""
        mean, _ = self.world.cold_step(self.z0, self.world.encode(x_t), j)
        return GaussianKernel(self.world.decode(mean), self.s2 * self.world.scaled_kernel_var()[j])

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
        rest = w.scaled_kernel_var()[j:].sum()
        v = w.fcst_mse[j]
        if torch.isnan(v):
            v = rest
        return self.s2 * torch.maximum(v, rest)

    def run(self, generator: torch.Generator | None = None, path: bool = False) -> Tensor:
        """Sample the chain: ``x_{k+h}`` ``(N, *S)``, or with ``path`` every lead
        ``(N, h, *S)``."""
        x, out = self.init(generator), []
        for j in range(len(self.times) - 1):
            x = self.kernel(x, j).sample(generator)
            out.append(x)
        return torch.stack(out, 1) if path else x


class DYffusionDataStep(nn.Module):
    """The first lead of DYffusion's cold-sampling chain as a Markov world of *one data
    step* (``dt = world.dt / h``), for filters that observe every data step.

    The step ``x_k -> x_{k+1}`` is the kernel of lead ``0 -> 1`` of :class:`DYffusionChain`
    (forecaster ``F(z_k, 0)``, interpolator difference ``I(z_k, x̂, 1) - I(z_k, x̂, 0)``)
    widened by an optional model error: ``N(mean, s^2 c v_0 + q^2)`` (``c`` the world's
    ``var_scale``). Restarting the cold
    sampler every data step uses only the first interpolation lead, so forecasts differ
    from :meth:`DYffusion.forecast_path` (which walks all ``h`` leads from one ``x_k``).
    Wraps (does not copy) ``world``; not a checkpoint kind.
    """

    def __init__(self, world: DYffusion, q: float = 0.0) -> None:
        super().__init__()
        self.world = world
        self.state_shape = world.state_shape
        self.dt = world.dt / world.horizon
        self.variable, self.dims = world.variable, world.dims
        self.meta = getattr(world, "meta", {})
        self.q = 0.0
        self.configure(q=q)

    def configure(
        self, steps: int | None = None, q: float | None = None, **options: object
    ) -> DYffusionDataStep:
        """Set the model-error std ``q`` (state units). The chain has one kernel:
        ``steps`` must be ``None`` (or 1)."""
        bad = sorted(k for k, v in options.items() if v is not None)
        if bad:
            raise ValueError(f"{type(self).__name__}.configure: no option(s) {bad} (only q)")
        if steps not in (None, 1):
            raise ValueError(f"DYffusionDataStep has one kernel per step; got steps={steps}")
        if q is not None:
            if not q >= 0:
                raise ValueError(f"model-error level q must be >= 0, got {q}")
            self.q = float(q)
        return self

    def transition_sampler(self, cond: Tensor) -> DYffusionDataChain:
        """The one-kernel chain ``x_k -> x_{k+1}`` from particles ``(N, *S)``."""
        return DYffusionDataChain(self.world, self.world.check(cond), self.q)

    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One data step ``(N, *S) -> (N, *S)``."""
        with torch.no_grad():
            return self.transition_sampler(x).run(generator)

    @torch.no_grad()
    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(members, n_steps, *S)`` by repeated :meth:`step`."""
        from models.worlds.base import rollout

        return rollout(self, x0, n_steps, members, generator)


class DYffusionDataChain:
    """``TransitionChain`` of :class:`DYffusionDataStep`: ``times = (1, 0)``, ``init`` is
    ``x_k``, one Gaussian kernel; ``denoise(., 0)`` is the kernel mean and
    ``denoise_var(0)`` its variance (exact for a single Gaussian step); ``q^2`` at the end."""

    def __init__(self, world: DYffusion, x_k: Tensor, q: float) -> None:
        self.world, self.x_k = world, x_k
        self.times = torch.tensor([1.0, 0.0], dtype=torch.float64, device=x_k.device)
        self.z0 = world.encode(x_k)
        self.var = world.state_std**2 * world.scaled_kernel_var()[0] + q**2
        self.q_var = torch.full_like(self.var, q**2)
        self._mean: Tensor | None = None

    def _first_mean(self) -> Tensor:
        if self._mean is None:
            self._mean = self.world.decode(self.world.cold_step(self.z0, self.z0, 0)[0])
        return self._mean

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """``x_k`` itself (nothing is drawn)."""
        return self.x_k.clone()

    def _check(self, x_t: Tensor, j: int) -> None:
        if j != 0:
            raise IndexError(f"DYffusionDataChain has one kernel (j = 0), got j = {j}")
        if x_t.shape != self.x_k.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} must match the chain's particles")

    def kernel(self, x_t: Tensor, j: int) -> GaussianKernel:
        """``N(cold-sampling mean of lead 1, s^2 v_0 + q^2)``; ``x_t`` is ``x_k`` (index 0
        holds no noise), possibly resampled: the mean is recomputed when it differs."""
        self._check(x_t, j)
        if x_t is self.x_k or torch.equal(x_t, self.x_k):
            mean = self._first_mean()
        else:
            z = self.world.encode(x_t)
            mean = self.world.decode(self.world.cold_step(z, z, 0)[0])
        return GaussianKernel(mean, self.var)

    def denoise(self, x_t: Tensor, j: int) -> Tensor:
        """``E[x_{k+1} | x_k]`` (the kernel mean) at ``j = 0``; the state at ``j = 1``."""
        if j in (1, -1):
            return x_t
        return self.kernel(x_t, j).mean

    def denoise_var(self, j: int) -> Tensor:
        """Kernel variance at ``j = 0``; ``q^2`` at ``j = 1``."""
        return self.q_var if j in (1, -1) else self.var

    def run(self, generator: torch.Generator | None = None) -> Tensor:
        """Sample ``x_{k+1}`` ``(N, *S)``."""
        return self.kernel(self.x_k, 0).sample(generator)
