"""The autoregressive conditional diffusion world ``p(x_{k+1} | x_{k-h+1..k})``.

A :class:`~models.diffusion.denoisers.Denoiser` is trained on a normalised target
``z`` conditioned on the normalised history window (channels ``h``):

* ``target="increment"``: ``x_{k+1} = x_k + m + s * z``   (m, s: increment mean/std)
* ``target="state"``:     ``x_{k+1} = m + s * z``         (m, s: state mean/std)

as in conditional diffusion emulators of weather/PDE steps (e.g. GenCast,
Price et al. 2024, which also predicts the normalised residual).

**The chain in state space.** With schedule ``z_t = alpha_t z_0 + sigma_t eps`` the
chain variable handed to ``assim`` is ``x_t = o + s * z_t / alpha_t`` (``o`` the
offset above), i.e. ``x_t = x_{k+1} + s r_t eps`` with ``r_t = sigma_t / alpha_t``:
a variance-exploding chain in physical units whatever the schedule. Kernels of
the sampler map by this affine change of variables (``mean -> o + s mean /
alpha_s``, ``var -> s^2 var / alpha_s^2``) so their densities stay exact.

**Model error q.** A deterministic system gives a near-delta learned transition.
The reverse diffusion is stopped at ``t_0`` with ``r_{t_0} = q / rms(s)``; the
final sample is the learned step plus ``N(0, q^2)`` (VE noise adds in quadrature;
per point ``(s_i r_{t_0})^2`` when normalisation is pointwise). ``q = 0`` runs the
sampler to its own ``t_min``.

**Twist variance.** ``denoise_var(j) = s^2 r2(r_{t_j}) + q^2`` before the last index
and ``q^2`` at it. ``r2`` is the denoiser's mean squared error on held-out windows
at that noise level (measured by :meth:`Conditional.calibrate` after training: an
estimate of ``E Var[z_0 | z_t, cond]``); uncalibrated worlds use the Gaussian
(Tweedie) value ``r^2 s_d^2 / (r^2 + s_d^2)``.

**History h > 1.** ``step``/``transition_sampler`` then take windows ``(N, h, *S)``
(oldest first) and ``forecast`` takes ``(h, *S)`` or ``(members, h, *S)``; filters
support the default ``h = 1`` (their particles are single states).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.diffusion.denoisers import Denoiser
from models.worlds._build import build_backbone, build_sampler, build_schedule
from models.worlds.conditional_chain import ConditionalChain, _MemoDenoiser  # noqa: F401

_N_CAL = 24  # noise levels of the calibration table


@dataclass(frozen=True)
class ConditionalSpec:
    """Plain-data description of a :class:`Conditional` world (stored in checkpoints)."""

    state_shape: tuple[int, ...]
    dt: float
    history: int = 1
    target: str = "increment"
    backbone: str = "resnet1d"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    schedule: str = "edm"
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    sigma_data: float = 1.0
    sampler: str = "ddpm"
    steps: int = 5
    eta: float = 1.0
    q: float = 0.0
    variable: str = "x"
    dims: tuple[str, ...] = ("x",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))
        object.__setattr__(self, "dims", tuple(str(d) for d in self.dims))
        if self.target not in ("increment", "state"):
            raise ValueError(f"target must be 'increment' or 'state', got {self.target!r}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if len(self.dims) != len(self.state_shape):
            raise ValueError(f"dims {self.dims} do not match state_shape {self.state_shape}")


def spec_fields(config: Any, dm: Any) -> dict[str, Any]:
    """The :class:`ConditionalSpec` fields that a training config (``models.train.TrainConfig``)
    and its set-up data module fix alike for every conditional-family world; each kind adds
    its own ``history``, ``backbone`` and extra fields."""
    return dict(
        state_shape=dm.state_shape,
        dt=dm.dt,
        target=config.target,
        backbone_kwargs=dict(config.backbone_kwargs),
        schedule=config.schedule,
        schedule_kwargs=dict(config.schedule_kwargs),
        sigma_data=config.sigma_data,
        sampler=config.sampler,
        steps=config.diffusion_steps,
        eta=config.eta,
        q=config.q,
        variable=dm.variable,
        dims=dm.grid_dims,
    )


class Conditional(nn.Module):
    """Conditional diffusion world (implements ``World`` and ``DiffusionWorld``).

    Args:
        spec: architecture, grid and inference defaults (:class:`ConditionalSpec`).
    Runtime options (:meth:`configure`): ``sampler`` (``"ddpm"``, ``"ddim"`` with
    ``eta``, ``"em"``, ``"heun"``), ``steps`` (diffusion steps per physical step) and
    ``q`` (model-error std in state units).
    """

    kind = "conditional"

    def __init__(self, spec: ConditionalSpec) -> None:
        super().__init__()
        self.spec = spec
        self.state_shape = spec.state_shape
        self.dt = float(spec.dt)
        self.history = spec.history
        self.variable, self.dims = spec.variable, spec.dims
        backbone = build_backbone(
            spec.backbone, spec.state_shape, spec.history, **spec.backbone_kwargs
        )
        schedule = build_schedule(spec.schedule, **spec.schedule_kwargs)
        self.denoiser = Denoiser(backbone, schedule, sigma_data=spec.sigma_data)
        for name in ("state_mean", "target_mean"):
            self.register_buffer(name, torch.zeros(spec.state_shape))
        for name in ("state_std", "target_std"):
            self.register_buffer(name, torch.ones(spec.state_shape))
        self.register_buffer("cal_log_ratio", torch.zeros(_N_CAL))
        self.register_buffer("cal_mse", torch.full((_N_CAL,), float("nan")))
        self.meta: dict = {}
        self.sampler_kind, self.steps, self.eta, self.q = spec.sampler, spec.steps, spec.eta, spec.q
        self.configure()

    # ------------------------------------------------------------------ set-up
    def configure(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        q: float | None = None,
    ) -> Conditional:
        """Change inference options in place (``None`` keeps the current value; no
        retraining) and rebuild the sampler; returns ``self``."""
        if sampler is not None:
            self.sampler_kind = sampler
        self.steps = int(self.steps if steps is None else steps)
        self.eta = float(self.eta if eta is None else eta)
        self.q = float(self.q if q is None else q)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.q < 0:
            raise ValueError(f"model-error level q must be >= 0, got {self.q}")
        self.sampler = build_sampler(self.sampler_kind, self.denoiser, eta=self.eta)
        return self

    def set_normalisation(self, stats: dict[str, Tensor]) -> None:
        """Copy ``state_mean/state_std/target_mean/target_std`` (each ``S``-shaped)."""
        for name in ("state_mean", "state_std", "target_mean", "target_std"):
            v = torch.as_tensor(stats[name], dtype=torch.float32)
            getattr(self, name).copy_(torch.broadcast_to(v, self.state_shape))

    def spec_dict(self) -> dict:
        d = dataclasses.asdict(self.spec)
        d.update(sampler=self.sampler_kind, steps=self.steps, eta=self.eta, q=self.q)
        d["state_shape"], d["dims"] = list(d["state_shape"]), list(d["dims"])
        return d

    @classmethod
    def from_checkpoint(cls, payload: dict) -> Conditional:
        spec = dict(payload["spec"])
        spec["state_shape"], spec["dims"] = tuple(spec["state_shape"]), tuple(spec["dims"])
        world = cls(ConditionalSpec(**spec))
        world.load_state_dict(payload["state_dict"])
        return world

    # ------------------------------------------------------------------ checks
    def check_data(self, variable: str | None = None, shape: tuple[int, ...] | None = None) -> None:
        """Raise ``ValueError`` naming both sides when a variable name or grid shape
        differs from the one this world was trained on."""
        if variable is not None and variable != self.variable:
            raise ValueError(
                f"variable {variable!r} does not match the world's variable {self.variable!r} "
                "(from its checkpoint)"
            )
        if shape is not None and tuple(shape) != tuple(self.state_shape):
            raise ValueError(
                f"grid shape {tuple(shape)} does not match the world's grid "
                f"{tuple(self.state_shape)} (dims {self.dims}, from its checkpoint)"
            )

    def _window(self, x: Tensor) -> Tensor:
        """``x`` as a window ``(N, h, *S)``; checks shape and device."""
        s, h = tuple(self.state_shape), self.history
        if h == 1 and tuple(x.shape[1:]) == s:
            x = x.unsqueeze(1)
        if x.dim() != len(s) + 2 or tuple(x.shape[1:]) != (h, *s):
            want = f"(N, {', '.join(map(str, s))})" if h == 1 else f"(N, {h}, *{s})"
            raise ValueError(
                f"states of shape {tuple(x.shape)} do not match the world's grid: expected "
                f"{want} (grid {s} from its checkpoint)"
            )
        if x.device != self.state_mean.device:
            raise ValueError(f"states are on {x.device}, the world on {self.state_mean.device}")
        return x.to(self.state_mean.dtype)

    # ------------------------------------------------------------------ encoding
    def encode_cond(self, window: Tensor) -> Tensor:
        """Normalised history ``(N, h, *S)``."""
        return (window - self.state_mean) / self.state_std

    def offset(self, window: Tensor) -> Tensor:
        """``o`` with ``x_{k+1} = o + s z``: ``x_k + m`` or ``m``, shape ``(N, *S)``."""
        if self.spec.target == "increment":
            return window[:, -1] + self.target_mean
        return self.target_mean.expand_as(window[:, -1])

    def encode_pair(self, history: Tensor, nxt: Tensor) -> tuple[Tensor, Tensor]:
        """Training pair ``(z0 (B, *S), cond (B, h, *S))`` from physical windows."""
        window = self._window(history)
        z0 = (nxt.to(window.dtype) - self.offset(window)) / self.target_std
        return z0, self.encode_cond(window)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, history: Tensor, nxt: Tensor, seed: int = 0) -> Tensor:
        """Measure ``E||D(z_t) - z_0||^2 / dim`` on held-out pairs at ``_N_CAL`` noise
        ratios (log-spaced over the schedule); stored for :meth:`denoise_var`."""
        z0, cond = self.encode_pair(history, nxt)
        g = torch.Generator(device=z0.device).manual_seed(seed)
        sched = self.denoiser.schedule
        lo, hi = (float(sched.sigma_ratio(t)) for t in (0.0, 1.0))
        log_r = torch.linspace(math.log(lo), math.log(hi), _N_CAL)
        mse = torch.empty(_N_CAL)
        for i, lr in enumerate(log_r):
            t = sched.t_of_sigma_ratio(lr.exp()).to(z0.device)
            alpha, sigma = sched(t.double())
            eps = torch.randn(z0.shape, generator=g, device=z0.device)
            z_t = float(alpha) * z0 + float(sigma) * eps
            mse[i] = ((self.denoiser(z_t, t, cond) - z0) ** 2).mean()
        self.cal_log_ratio.copy_(log_r)
        self.cal_mse.copy_(torch.cummax(mse, 0).values)  # the MMSE grows with the noise
        return self.cal_mse

    def posterior_var(self, ratio: Tensor) -> Tensor:
        """``r2(r)``: variance of ``z_0`` around ``D(z_t)`` at noise ratio ``r`` (scalar)."""
        if torch.isnan(self.cal_mse).any():
            sd2 = self.spec.sigma_data**2
            return ratio**2 * sd2 / (ratio**2 + sd2)
        x = ratio.log().clamp(self.cal_log_ratio[0], self.cal_log_ratio[-1])
        i = torch.searchsorted(self.cal_log_ratio, x.reshape(1)).clamp(1, _N_CAL - 1)
        x0, x1 = self.cal_log_ratio[i - 1], self.cal_log_ratio[i]
        y0, y1 = self.cal_mse[i - 1].clamp_min(1e-30).log(), self.cal_mse[i].clamp_min(1e-30).log()
        return torch.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0)).reshape(())

    # ------------------------------------------------------------------ protocol
    def transition_sampler(self, cond: Tensor) -> ConditionalChain:
        """The diffusion chain of one physical step from particles ``cond`` ``(N, *S)``
        (or windows ``(N, h, *S)``), in state space."""
        return ConditionalChain(self, self._window(cond))

    @torch.no_grad()
    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One physical step ``(N, *S) -> (N, *S)``: runs :meth:`transition_sampler`."""
        return self.transition_sampler(x).run(generator)

    @torch.no_grad()
    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Autoregressive ensemble ``(members, n_steps, *S)`` from ``x0`` ``(*S)`` or
        ``(members, *S)`` (windows ``(h, *S)`` / ``(members, h, *S)`` when ``h > 1``)."""
        core = len(self.state_shape) + (self.history > 1)
        if x0.dim() == core:
            x0 = x0.unsqueeze(0).expand(members, *x0.shape)
        if x0.shape[0] != members:
            raise ValueError(f"x0 has {x0.shape[0]} members, members={members}")
        window = self._window(x0)
        out = []
        for _ in range(n_steps):
            nxt = ConditionalChain(self, window).run(generator)
            out.append(nxt)
            window = torch.cat([window[:, 1:], nxt.unsqueeze(1)], 1)
        if not out:
            return window.new_empty((members, 0, *self.state_shape))
        return torch.stack(out, 1)
