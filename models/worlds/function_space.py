"""Function-space diffusion world: Gaussian-process noise and an FNO backbone.

The autoregressive conditional world (:mod:`models.worlds.conditional`, extended here,
not forked) with white noise replaced by a Matérn Gaussian process defined in physical
units on the periodic domain (:class:`~models.diffusion.gp_noise.MaternGP`), as in
Lim et al. (2023, "Score-based diffusion models in function space") and Kerrigan et al.
(2023, "Diffusion generative models in infinite dimensions"). The forward process is
``z_t = alpha_t z_0 + sigma_t C^{1/2} xi``; the denoiser (EDM-preconditioned FNO,
resolution-agnostic) predicts ``z_0``. Because the forward noise has covariance ``C``
everywhere, the sampler posteriors keep their white-noise means (DDPM, DDIM: their
``eps`` estimate is coloured; Euler–Maruyama: ``C grad log p_t = (alpha D - z)/sigma^2``
is the same preconditioned drift) and their covariances become ``var * C``. Each kernel
is therefore a :class:`~models.diffusion.gp_noise.GPKernel` ``N(mean, v C)`` in state
space, whose ``log_prob`` whitens with ``C^{-1/2}`` (diagonal in Fourier space) and adds
``-0.5 log det C``: densities stay exact without leaving state space.

Normalisation is a single mean and std (the prior must not depend on the grid), and
:meth:`FunctionSpace.regrid` returns the same model on another grid of the same
physical domain (e.g. trained at 64², sampled at 32² or 128²). The model-error noise
``q`` (the chain stops at noise level ``q``) is GP-coloured as well.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.diffusion.gp_noise import GPKernel, MaternGP
from models.worlds.conditional import (
    _N_CAL,
    Conditional,
    ConditionalChain,
    ConditionalSpec,
    spec_fields,
)


@dataclass(frozen=True)
class FunctionSpaceSpec(ConditionalSpec):
    """:class:`ConditionalSpec` plus the GP prior (``lengths`` of the periodic domain in
    physical units, ``None``: grid spacing 1; Matérn ``lengthscale`` and ``nu``)."""

    backbone: str = "fno"
    lengths: tuple[float, ...] | None = None
    lengthscale: float = 2.0
    nu: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone != "fno":
            raise ValueError(
                f"FunctionSpace needs the resolution-agnostic 'fno' backbone, got {self.backbone!r}"
            )
        lengths = self.lengths if self.lengths is not None else self.state_shape
        object.__setattr__(self, "lengths", tuple(float(v) for v in lengths))
        if len(self.lengths) != len(self.state_shape):
            raise ValueError(f"lengths {self.lengths} do not match state_shape {self.state_shape}")
        kw = dict(self.backbone_kwargs)
        kw.setdefault("modes", [min(12, n // 2) for n in self.state_shape])
        object.__setattr__(self, "backbone_kwargs", kw)


class FunctionSpace(Conditional):
    """Conditional diffusion world with GP noise (``World`` + ``DiffusionWorld``)."""

    kind = "function_space"

    def __init__(self, spec: FunctionSpaceSpec) -> None:
        super().__init__(spec)
        self.gp = MaternGP(spec.lengths, spec.lengthscale, spec.nu, 1.0)

    def spec_dict(self) -> dict:
        d = super().spec_dict()
        d["lengths"] = list(d["lengths"])
        d["backbone_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in d["backbone_kwargs"].items()
        }
        return d

    @classmethod
    def from_checkpoint(cls, payload: dict) -> FunctionSpace:
        spec = dict(payload["spec"])
        for k in ("state_shape", "dims", "lengths"):
            spec[k] = tuple(spec[k])
        world = cls(FunctionSpaceSpec(**spec))
        world.load_state_dict(payload["state_dict"])
        return world

    # ------------------------------------------------------------------ training hooks
    @classmethod
    def prepare_config(cls, config: Any) -> Any:
        """Check a ``TrainConfig``: global normalisation and ``history = 1``."""
        if config.normalise != "global" or config.history != 1:
            raise ValueError(
                "world='function_space' needs normalise='global' and history=1 "
                f"(got {config.normalise!r}, {config.history})"
            )
        return config

    @classmethod
    def from_config(cls, config: Any, dm: Any) -> FunctionSpace:
        """A fresh world for a set-up ``WindowDataModule``; ``world_kwargs`` may hold
        ``lengths``, ``lengthscale``, ``nu``."""
        try:
            spec = FunctionSpaceSpec(
                history=1, backbone="fno", **spec_fields(config, dm), **dict(config.world_kwargs)
            )
        except TypeError as exc:
            raise ValueError(f"world_kwargs for world='function_space': {exc}") from exc
        world = cls(spec)
        world.set_normalisation(dm.stats)
        return world

    def set_normalisation(self, stats: dict[str, Tensor]) -> None:
        """Global normalisation only: every statistic must be one number (grid-free)."""
        glob = {}
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float32)
            if v.numel() > 1 and not torch.allclose(v, v.flatten()[0].expand_as(v)):
                raise ValueError(
                    f"FunctionSpace needs global normalisation (normalise='global'); {k} varies "
                    "over the grid"
                )
            glob[k] = v.flatten()[0] if v.numel() else v
        super().set_normalisation(glob)

    def regrid(self, shape: tuple[int, ...]) -> FunctionSpace:
        """The same model (weights copied) on a grid ``shape`` of the same physical domain."""
        spec = dataclasses.replace(self.spec, state_shape=tuple(int(n) for n in shape))
        other = FunctionSpace(spec).to(self.state_mean.device)
        sd = {}
        for k, v in self.state_dict().items():
            sd[k] = (
                v.flatten()[0].expand(spec.state_shape).clone()
                if v.shape == self.state_mean.shape and k.endswith(("_mean", "_std"))
                else v
            )
        other.load_state_dict(sd)
        other.configure(sampler=self.sampler_kind, steps=self.steps, eta=self.eta, q=self.q)
        other.meta = dict(self.meta)
        return other.train(self.training)

    # ------------------------------------------------------------------ training
    def gp_noise(
        self, shape: tuple[int, ...], generator=None, like: Tensor | None = None
    ) -> Tensor:
        """GP draws ``C^{1/2} xi`` of shape ``(B, *S)``."""
        dev = None if like is None else like.device
        dt = torch.float32 if like is None else like.dtype
        return self.gp.sample(tuple(shape), generator, device=dev, dtype=dt)

    def training_loss(
        self, history: Tensor, nxt: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """EDM-weighted denoising loss with GP noise:
        ``E lambda(r) ||D(alpha z_0 + sigma C^{1/2} xi) - z_0||^2 / dim``."""
        z0, cond = self.encode_pair(history, nxt)
        den = self.denoiser
        t = den.sample_t(z0.shape[0], generator=generator, device=z0.device)
        alpha, sigma = den.schedule(t)
        shp = (-1, *([1] * (z0.dim() - 1)))
        a, sg = alpha.to(z0.dtype).reshape(shp), sigma.to(z0.dtype).reshape(shp)
        z_t = a * z0 + sg * self.gp_noise(z0.shape, generator, z0)
        r = sg / a
        weight = (r**2 + den.sigma_data**2) / (r * den.sigma_data) ** 2
        return (weight * (den(z_t, t, cond) - z0) ** 2).flatten(1).mean(1).mean()

    @torch.no_grad()
    def calibrate(self, history: Tensor, nxt: Tensor, seed: int = 0) -> Tensor:
        """As :meth:`Conditional.calibrate`, with GP noise."""
        z0, cond = self.encode_pair(history, nxt)
        g = torch.Generator(device=z0.device).manual_seed(seed)
        sched = self.denoiser.schedule
        lo, hi = (float(sched.sigma_ratio(t)) for t in (0.0, 1.0))
        log_r = torch.linspace(math.log(lo), math.log(hi), _N_CAL)
        mse = torch.empty(_N_CAL)
        for i, lr in enumerate(log_r):
            t = sched.t_of_sigma_ratio(lr.exp()).to(z0.device)
            alpha, sigma = sched(t.double())
            z_t = float(alpha) * z0 + float(sigma) * self.gp_noise(z0.shape, g, z0)
            mse[i] = ((self.denoiser(z_t, t, cond) - z0) ** 2).mean()
        self.cal_log_ratio.copy_(log_r)
        self.cal_mse.copy_(torch.cummax(mse, 0).values)
        return self.cal_mse

    # ------------------------------------------------------------------ protocol
    def transition_sampler(self, cond: Tensor) -> FunctionSpaceChain:
        """The GP-noise chain of one physical step from particles ``(N, *S)``."""
        return FunctionSpaceChain(self, self._window(cond))

    @torch.no_grad()
    def forecast(self, x0, n_steps, members=1, generator=None) -> Tensor:
        """Autoregressive ensemble ``(members, n_steps, *S)`` (repeated :meth:`step`), in
        the world's dtype."""
        from models.worlds.base import rollout

        return rollout(self, x0.to(self.state_mean.dtype), n_steps, members, generator)


class FunctionSpaceChain(ConditionalChain):
    """:class:`ConditionalChain` whose prior draw and kernels carry the GP covariance."""

    def __init__(self, world: FunctionSpace, window: Tensor) -> None:
        if world.history != 1:
            raise ValueError("FunctionSpace supports history = 1")
        super().__init__(world, window)
        self.gp = world.gp
        self.s0 = world.target_std.flatten()[0]
        if world.q > 0:  # GP-coloured model error: its per-point variance is q^2 (grid C_ii)
            self.q_var = (self.s * self.ratio[-1]) ** 2 * self.gp.marginal_variance(self.shape[1:])

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """``x_{t_J}``: prior std times a GP draw, mapped to state space."""
        std = float(self.sampler.prior_std(float(self.times[0])))
        z = std * self.gp.sample(tuple(self.shape), generator, self.o.device, self.o.dtype)
        return self._to_x(z, 0)

    def kernel(self, x_t: Tensor, j: int) -> GPKernel:
        """``N(mean, v C)`` of ``times[j] -> times[j+1]`` in state units (exact affine map
        of the sampler's kernel; ``v`` is its scalar variance times ``s^2 / alpha_s^2``)."""
        k = self.sampler.transition(self._to_z(x_t, j), self.times[j], self.times[j + 1], self.cond)
        a = self.alpha[j + 1]
        var = (self.s0**2 * k.var / a**2).reshape(-1)[:1].reshape(())
        return GPKernel(self.o + self.s * k.mean / a, var.to(x_t.dtype), self.gp)
