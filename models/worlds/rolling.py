"""Rolling diffusion (Ruhe et al., ICML 2024, "Rolling diffusion models").

A window of ``W`` future frames ``z_{k+1..k+W}`` (normalised states) is denoised jointly,
conditioned on the last clean frame ``z_k``; frame ``w = 0..W-1`` has its own diffusion
time, rising with lead. With a global time ``tau`` running from 1 to 0:

* rolling phase: ``t_w(tau) = (w + tau) / W``. At ``tau = 1`` frame ``w`` sits at
  ``(w + 1) / W``, at ``tau = 0`` at ``w / W``: frame 0 is clean and is emitted, the
  window shifts by one and a pure-noise frame (``t = 1``) is appended, which restores
  the ``tau = 1`` levels. Each physical step is ``shift_steps`` denoising steps.
* initialisation phase (the first window, from pure noise everywhere):
  ``t_w(tau) = tau + (1 - tau) (w + 1) / W``, ending at the rolling-phase start levels.

Training (paper §3.2) draws ``tau ~ U(0, 1)`` and the rolling (probability
``1 - p_init``) or initialisation levels, noises each frame with its own level and
minimises the EDM-weighted denoising loss of every frame. The denoiser is EDM
preconditioned per frame; the backbone sees the ``W`` frames as channels and the clean
context frame plus the per-frame noise embeddings ``log(r_w)/4`` as condition channels.
Each denoising step is the per-frame DDPM posterior (Ho et al. 2020), a Gaussian kernel.

**World protocol.** ``step``/``transition_sampler`` are Markov in the state ``x_k``: the
chain of one physical step runs the initialisation phase from ``x_k`` and then one
rolling phase, exposing the kernels of the frame that leaves (frame 0, diffusion times
``1 -> 1/W -> 0``); the other ``W - 1`` frames are per-particle hidden state of the chain,
advanced inside :meth:`RollingChain.kernel` with noise drawn at :meth:`RollingChain.init`
(so kernels are pure functions of ``x_t`` and a filter that resamples inside the chain
must call :meth:`RollingChain.reindex`). :meth:`Rolling.rollout` is the paper's sampler:
the window persists across physical steps and each step emits exactly one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.worlds._build import build_schedule
from models.worlds._multistep import SpecWorld, make_backbone
from models.worlds.rolling_chain import RollingChain


@dataclass(frozen=True)
class RollingSpec:
    """Plain-data description of a :class:`Rolling` world (stored in checkpoints)."""

    state_shape: tuple[int, ...]
    dt: float
    window: int = 4
    shift_steps: int = 2  # denoising steps per physical step (rolling phase)
    init_steps: int = 8  # denoising steps of the initialisation phase
    p_init: float = 0.25
    schedule: str = "edm"
    schedule_kwargs: dict[str, Any] = field(default_factory=lambda: {"sigma_max": 20.0})
    sigma_data: float = 1.0
    backbone: str = "auto"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    variable: str = "x"
    dims: tuple[str, ...] = ("x",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))
        object.__setattr__(self, "dims", tuple(str(d) for d in self.dims))
        if self.window < 1 or self.shift_steps < 1 or self.init_steps < 1:
            raise ValueError(
                "Rolling: window, shift_steps and init_steps must be >= 1, got "
                f"{self.window}, {self.shift_steps}, {self.init_steps}"
            )
        if not 0.0 <= self.p_init <= 1.0:
            raise ValueError(f"Rolling: p_init must be in [0, 1], got {self.p_init}")
        if len(self.dims) != len(self.state_shape):
            raise ValueError(f"dims {self.dims} do not match state_shape {self.state_shape}")


def rolling_levels(tau: Tensor, window: int) -> Tensor:
    """``t_w = (w + tau) / W``, shape ``(*tau.shape, W)``."""
    w = torch.arange(window, dtype=tau.dtype, device=tau.device)
    return (w + tau.unsqueeze(-1)) / window


def init_levels(tau: Tensor, window: int) -> Tensor:
    """``t_w = tau + (1 - tau) (w + 1) / W``, shape ``(*tau.shape, W)``."""
    w = torch.arange(window, dtype=tau.dtype, device=tau.device)
    tau = tau.unsqueeze(-1)
    return tau + (1 - tau) * (w + 1) / window


class Rolling(SpecWorld):
    """Rolling-diffusion world (``World`` + ``DiffusionWorld``)."""

    kind = "rolling"
    spec_cls = RollingSpec
    window_key = "window"
    config_fields = ("schedule", "schedule_kwargs", "sigma_data")

    def __init__(self, spec: RollingSpec) -> None:
        super().__init__(spec)
        self.dt = float(spec.dt)
        self.W = spec.window
        self.schedule = build_schedule(spec.schedule, **spec.schedule_kwargs)
        self.sigma_data = float(spec.sigma_data)
        self.denoiser = nn.ModuleDict(
            {
                "backbone": make_backbone(
                    spec.backbone, spec.state_shape, self.W, 1 + self.W, **spec.backbone_kwargs
                )
            }
        )
        self.q = 0.0
        n_levels = spec.init_steps + spec.shift_steps + 1  # indices of the Markov chain
        self.register_buffer("cal_mse", torch.full((n_levels,), float("nan")))  # calibrate()

    def configure(
        self, steps: int | None = None, q: float | None = None, **options: object
    ) -> Rolling:
        """Set the model-error std ``q`` (state units) added to the last kernel of the
        Markov chain (as in the conditional world: the step is the learned sample plus
        ``N(0, q^2)``; every twist variance gains ``q^2``). The chain length is fixed by
        the spec (``init_steps + shift_steps``): ``steps`` must be ``None``; other options
        (a filter passing e.g. ``sampler=None``) must be ``None``."""
        bad = sorted(k for k, v in options.items() if v is not None)
        if bad:
            raise ValueError(f"{type(self).__name__}.configure: no option(s) {bad} (only q)")
        if steps is not None:
            raise ValueError(
                f"Rolling: the chain has init_steps + shift_steps = "
                f"{self.spec.init_steps + self.spec.shift_steps} kernels (from the checkpoint); "
                f"steps={steps} cannot change it (pass steps=None)"
            )
        if q is not None:
            if not q >= 0:
                raise ValueError(f"model-error level q must be >= 0, got {q}")
            self.q = float(q)
        return self

    # ------------------------------------------------------------------ denoiser
    def _coef(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.schedule(t.to(torch.float64))
        return alpha, sigma

    def _frames(self, v: Tensor, like: Tensor) -> Tensor:
        """``(B, W)`` or ``(W,)`` -> broadcastable to ``(B, W, *S)`` in ``like``'s dtype."""
        v = v.to(like.dtype)
        if v.dim() == 1:
            v = v.unsqueeze(0)
        return v.reshape(v.shape[0], self.W, *([1] * len(self.state_shape)))

    def denoise_window(self, z_t: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        """``E[z_0 | z_t]`` for a window ``z_t`` ``(B, W, *S)`` with per-frame times ``t``
        (``(W,)`` or ``(B, W)``) given the clean context ``ctx`` ``(B, *S)``
        (EDM preconditioning per frame, Karras et al. 2022)."""
        alpha, sigma = self._coef(t)
        r = sigma / alpha
        sd2 = self.sigma_data**2
        c_skip, c_out = sd2 / (r**2 + sd2), r * self.sigma_data / (r**2 + sd2).sqrt()
        c_in, c_noise = (r**2 + sd2).rsqrt(), r.log() / 4
        x_s = z_t / self._frames(alpha, z_t)
        c_noise = c_noise.to(z_t.dtype).expand(z_t.shape[0], self.W)
        maps = self._frames(c_noise, z_t).expand_as(z_t)
        cond = torch.cat([ctx.unsqueeze(1), maps], 1)
        out = self.denoiser["backbone"](self._frames(c_in, z_t) * x_s, c_noise.mean(1), cond)
        return self._frames(c_skip, z_t) * x_s + self._frames(c_out, z_t) * out

    def window_kernel(
        self, z_t: Tensor, t: Tensor, s: Tensor, ctx: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-frame DDPM posterior ``q(z_s | z_t, z_0 = D)`` from times ``t`` to ``s <= t``
        (each ``(W,)``): ``(mean (B, W, *S), var (1, W, 1..), x0_hat)``. With
        ``e = SNR_t / SNR_s``: mean ``(a_s/a_t) e z_t + a_s (1 - e) D``, var
        ``sigma_s^2 (1 - e)``; a frame with ``s = t`` is left unchanged (``var = 0``)."""
        x0 = self.denoise_window(z_t, t, ctx)
        a_t, sg_t = self._coef(t)
        a_s, sg_s = self._coef(s)
        e = ((a_t / sg_t) ** 2 / (a_s / sg_s) ** 2).clamp(max=1.0)
        e = torch.where(s >= t, torch.ones_like(e), e)
        mean = self._frames(a_s / a_t * e, z_t) * z_t + self._frames(a_s * (1 - e), z_t) * x0
        return mean, self._frames(sg_s**2 * (1 - e), z_t), x0

    def prior(self, shape: tuple[int, ...], generator, like: Tensor) -> Tensor:
        """Pure-noise frames at ``t = 1``: ``N(0, a_1^2 s_d^2 + sigma_1^2)``."""
        a, sg = self._coef(torch.ones((), device=like.device))
        std = float((a**2 * self.sigma_data**2 + sg**2).sqrt())
        return std * torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

    # ------------------------------------------------------------------ training
    def training_loss(
        self, history: Tensor, nxt: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """EDM-weighted loss over the frames of windows ``x_k..x_{k+W}`` (``history``
        ``(B, W, *S)``, ``nxt`` ``(B, *S)``) at rolling or initialisation levels."""
        w = self.encode(self.window(history, nxt))
        if w.shape[1] != self.W + 1:
            raise ValueError(
                f"Rolling(window={self.W}) needs windows of {self.W + 1} states, got "
                f"{w.shape[1]} (train with history = window)"
            )
        ctx, z0 = w[:, 0], w[:, 1:]
        b, dev = w.shape[0], w.device
        tau = torch.rand(b, generator=generator, device=dev, dtype=torch.float64)
        use_init = torch.rand(b, generator=generator, device=dev) < self.spec.p_init
        t = torch.where(
            use_init.unsqueeze(1), init_levels(tau, self.W), rolling_levels(tau, self.W)
        )
        alpha, sigma = self._coef(t)
        eps = torch.randn(z0.shape, generator=generator, device=dev, dtype=z0.dtype)
        z_t = self._frames(alpha, z0) * z0 + self._frames(sigma, z0) * eps
        r = sigma / alpha
        weight = (r**2 + self.sigma_data**2) / (r * self.sigma_data) ** 2
        err = (self.denoise_window(z_t, t, ctx) - z0) ** 2
        return (self._frames(weight, z0) * err).mean()

    @torch.no_grad()
    def calibrate(self, history: Tensor, nxt: Tensor, seed: int = 0) -> Tensor:
        """Measure the twist variance of the Markov chain on held-out windows.

        ``history`` ``(B, H, *S)`` and ``nxt`` ``(B, *S)`` are consecutive states (the
        training windows); the pairs ``(x_k, x_{k+1})`` are their first two frames. The
        chain of one step is run from every ``x_k`` with its own draws and, at each index
        ``j``, ``cal_mse[j] = mean((denoise(x_{t_j}) - x_{k+1})^2 / s^2)`` (normalised
        units), made non-increasing along the chain (a later, less noisy index is never
        given more variance than an earlier one). :meth:`RollingChain.denoise_var` then
        returns ``s^2 cal_mse[j] + q^2``. Returns ``cal_mse``."""
        full = self.window(history, nxt)
        x_k, x_1 = self.check(full[:, 0]), full[:, 1].to(self.state_mean)
        dev = x_k.device
        g = torch.Generator(dev).manual_seed(seed)
        chain = RollingChain(self, x_k)
        x = chain.init(g)
        n = len(chain.times) - 1
        mse = torch.zeros(n + 1, dtype=torch.float64, device=dev)
        for j in range(n):
            err = (chain.denoise(x, j) - x_1) / self.state_std
            mse[j] = err.double().pow(2).mean()
            x = chain.kernel(x, j).sample(g)
        mse = torch.flip(torch.cummax(torch.flip(mse, [0]), 0).values, [0])
        self.cal_mse.copy_(mse.to(self.cal_mse))
        return self.cal_mse

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Checkpoints written before :meth:`calibrate` existed load uncalibrated (the
        Tweedie twist variance), as ``BatchNorm`` does for its later buffers."""
        state_dict.setdefault(prefix + "cal_mse", torch.full_like(self.cal_mse, float("nan")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ protocol
    def levels(self, device=None) -> Tensor:
        """Per-frame times of the Markov chain of one step, ``(init + shift + 1, W)``:
        the initialisation phase then one rolling phase (float64)."""
        ti = torch.linspace(1.0, 0.0, self.spec.init_steps + 1, dtype=torch.float64, device=device)
        tr = torch.linspace(1.0, 0.0, self.spec.shift_steps + 1, dtype=torch.float64, device=device)
        return torch.cat([init_levels(ti, self.W), rolling_levels(tr[1:], self.W)], 0)

    def transition_sampler(self, cond: Tensor) -> RollingChain:
        """Chain of one physical step from ``x_k`` ``(N, *S)``; state = frame 0."""
        return RollingChain(self, self.check(cond))

    @torch.no_grad()
    def rollout(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
        return_levels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The rolling sampler: ``(members, n_steps, *S)``, one frame emitted per step.

        With ``return_levels`` also the per-frame times visited, ``(n_steps,
        shift_steps + 1, W)`` (rows: the window's levels before each denoising step and
        after the last one, before the shift)."""
        if x0.dim() == len(self.state_shape):
            x0 = x0.unsqueeze(0).expand(members, *x0.shape)
        ctx = self.encode(self.check(x0))
        if ctx.shape[0] != members:
            raise ValueError(f"x0 has {ctx.shape[0]} members, members={members}")
        dev = ctx.device
        z = self.prior((members, self.W, *self.state_shape), generator, ctx)
        ti = torch.linspace(1.0, 0.0, self.spec.init_steps + 1, dtype=torch.float64, device=dev)
        z = self._walk(z, init_levels(ti, self.W), ctx, generator)
        tr = torch.linspace(1.0, 0.0, self.spec.shift_steps + 1, dtype=torch.float64, device=dev)
        roll = rolling_levels(tr, self.W)
        out, seen = [], []
        for _ in range(n_steps):
            z = self._walk(z, roll, ctx, generator)
            seen.append(roll)
            ctx = z[:, 0]
            out.append(self.decode(ctx))
            new = self.prior((members, 1, *self.state_shape), generator, ctx)
            z = torch.cat([z[:, 1:], new], 1)
        fc = torch.stack(out, 1) if out else ctx.new_empty((members, 0, *self.state_shape))
        if return_levels:
            return fc, torch.stack(seen) if seen else roll.new_empty((0, *roll.shape))
        return fc

    def _walk(self, z: Tensor, levels: Tensor, ctx: Tensor, generator) -> Tensor:
        for j in range(len(levels) - 1):
            mean, var, _ = self.window_kernel(z, levels[j], levels[j + 1], ctx)
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = mean + var.sqrt() * eps
        return z
