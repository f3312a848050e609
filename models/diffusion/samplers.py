"""Reverse-diffusion samplers whose every step is an explicit Gaussian kernel.

A sampler wraps a denoiser (anything with ``forward(x_t, t, cond) -> x0_hat`` and a
``schedule`` attribute: a trained :class:`~models.diffusion.denoisers.Denoiser` or an
oracle from :mod:`models.diffusion.oracles`). ``transition(x_t, t, s, cond)`` returns the
:class:`~models.diffusion.kernel.GaussianKernel` ``p(x_s | x_t)`` of one step ``t -> s < t``
so that SMC can weight it and guidance can shift its mean; ODE samplers report ``var = 0``.

Notation: ``alpha, sigma`` from the schedule, ``lambda = log(alpha^2 / sigma^2)``,
``x0 = D(x_t, t)``, ``e = exp(lambda_t - lambda_s) = SNR_t / SNR_s in (0, 1]``.

- :class:`DDPM` (Ho et al. 2020): the posterior ``q(x_s | x_t, x_0 = x0)``,
  mean ``(alpha_s / alpha_t) e x_t + alpha_s (1 - e) x0``, var ``sigma_s^2 (1 - e)``.
- :class:`DDIM` (Song, Meng & Ermon 2021): var ``c^2 = eta^2 sigma_s^2 (1 - e)``, mean
  ``alpha_s x0 + sqrt(sigma_s^2 - c^2) (x_t - alpha_t x0) / sigma_t``; ``eta = 1`` is DDPM,
  ``eta = 0`` the probability-flow ODE's exponential integrator.
- :class:`EulerMaruyama` (Song et al. 2021, reverse SDE): with ``f, g^2`` from
  :meth:`Schedule.drift_diffusion` at ``t`` and ``h = t - s``:
  mean ``x_t - h (f x_t - g^2 score)``, var ``g^2 h``.
- :class:`Heun` (Karras et al. 2022, Alg. 1) on the scaled variable ``x~ = x / alpha``
  with noise ``r = sigma / alpha``: ``dx~/dr = (x~ - D) / r``; Euler predictor then
  trapezoidal corrector; var ``0``.

Sampling starts from ``x_{t_max} ~ N(0, alpha^2 sigma_data^2 + sigma^2)`` (the isotropic
Gaussian matching the second moment of the marginal for standardised data; for VP its
``alpha_1`` is tiny and for VE ``sigma_max >> sigma_data``, so the mismatch is negligible).
With ``t_min = 0`` and ``return_x0`` the final step returns the Tweedie mean
``D(x_{t_1}, t_1)`` (EDM's last step to ``sigma = 0``); with ``t_min > 0`` the chain stops
at the noisy state ``x_{t_min}`` (use :meth:`Schedule.t_of_sigma_ratio` to pick the level).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from models.diffusion.denoisers import as_time, bcast
from models.diffusion.kernel import GaussianKernel


def _device_dtype(denoiser, cond: Tensor | None, device, dtype) -> tuple[torch.device, torch.dtype]:
    ref = cond
    if ref is None and isinstance(denoiser, torch.nn.Module):
        ref = next(iter(list(denoiser.parameters()) + list(denoiser.buffers())), None)
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else None)
    dt = dtype if dtype is not None else (ref.dtype if ref is not None else None)
    if dt is None or not dt.is_floating_point:
        dt = torch.get_default_dtype()
    return dev or torch.device("cpu"), dt


class Sampler(ABC):
    """Base class: a sampler is one :meth:`transition`; :meth:`sample` loops it.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> x0_hat`` with a ``schedule`` attribute and
            optionally ``sigma_data`` (default 1).
        spacing: time grid of :meth:`timesteps`: ``"t"`` (uniform in ``t``; for
            :class:`~models.diffusion.schedules.EDM` that is the rho-spacing in sigma, for
            cosine VP the usual grid) or ``"log_snr"`` (uniform in ``lambda``).
    """

    default_spacing = "t"

    def __init__(self, denoiser, spacing: str | None = None) -> None:
        if not hasattr(denoiser, "schedule"):
            raise TypeError(f"{type(self).__name__}: the denoiser needs a `schedule` attribute")
        spacing = spacing or self.default_spacing
        if spacing not in ("t", "log_snr"):
            raise ValueError(f"{type(self).__name__}: spacing must be 't' or 'log_snr'")
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.spacing = spacing

    # ---- grid and prior -------------------------------------------------------------
    def timesteps(self, steps: int, t_min: float = 0.0, t_max: float = 1.0, device=None) -> Tensor:
        """Decreasing grid ``t_max = t_0 > ... > t_steps = t_min``, shape ``(steps + 1,)``,
        float64."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 <= float(t_min) < float(t_max) <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        kw = dict(dtype=torch.float64, device=device)
        if self.spacing == "t":
            ts = torch.linspace(float(t_max), float(t_min), int(steps) + 1, **kw)
        else:
            lo = self.schedule.log_snr(torch.tensor(float(t_max), **kw))
            hi = self.schedule.log_snr(torch.tensor(float(t_min), **kw))
            lam = torch.linspace(0.0, 1.0, int(steps) + 1, **kw) * (hi - lo) + lo
            ts = self.schedule.t_of_log_snr(lam)
            ts[0], ts[-1] = float(t_max), float(t_min)
        return ts

    def prior_std(self, t_max: float = 1.0) -> Tensor:
        """``sqrt(alpha^2 sigma_data^2 + sigma^2)`` at ``t_max``."""
        alpha, sigma = self.schedule(torch.tensor(float(t_max), dtype=torch.float64))
        sd = float(getattr(self.denoiser, "sigma_data", 1.0))
        return torch.sqrt(alpha**2 * sd**2 + sigma**2)

    def init(
        self,
        shape: tuple[int, ...],
        t_max: float = 1.0,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``x_{t_max} ~ N(0, prior_std^2 I)``, shape ``shape = (N, *S)``."""
        dtype = dtype or torch.get_default_dtype()
        eps = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return float(self.prior_std(t_max)) * eps

    # ---- one step ---------------------------------------------------------------------
    def _coefficients(self, x: Tensor, t, s) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        t, s = as_time(t, x), as_time(s, x)
        if torch.any(s >= t):
            raise ValueError(f"{type(self).__name__}.transition: need s < t, got t={t}, s={s}")
        t64, s64 = t.to(torch.float64), s.to(torch.float64)
        a_t, sg_t = self.schedule(t64)
        a_s, sg_s = self.schedule(s64)
        lam_t, lam_s = self.schedule.log_snr(t64), self.schedule.log_snr(s64)
        c = dict(a_t=a_t, sg_t=sg_t, a_s=a_s, sg_s=sg_s, one_minus_e=-torch.expm1(lam_t - lam_s))
        c["e"] = 1.0 - c["one_minus_e"]
        return t, s, c

    @abstractmethod
    def transition(
        self, x_t: Tensor, t: float | Tensor, s: float | Tensor, cond: Tensor | None = None
    ) -> GaussianKernel:
        """Gaussian kernel ``p(x_s | x_t)`` of one step ``t -> s < t``; ``x_t`` is
        ``(B, *S)``, ``t, s`` scalars or ``(B,)``."""

    # ---- full chain -------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        shape: tuple[int, ...],
        cond: Tensor | None = None,
        steps: int = 64,
        generator: torch.Generator | None = None,
        t_min: float = 0.0,
        t_max: float = 1.0,
        return_x0: bool = True,
        x_init: Tensor | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Run the chain over :meth:`timesteps` and return ``(N, *S)`` samples.

        ``shape = (N, *S)``; ``cond`` ``(N, ...)`` is passed to every denoiser call.
        Device/dtype come from ``x_init``, else the arguments, else ``cond``, else the
        denoiser's parameters/buffers. ``generator`` must live on that device.
        """
        shape = tuple(shape)
        if cond is not None and cond.shape[0] != shape[0]:
            raise ValueError(
                f"cond has leading size {cond.shape[0]} but shape asks for {shape[0]} samples"
            )
        if x_init is None:
            dev, dt = _device_dtype(self.denoiser, cond, device, dtype)
            x = self.init(shape, t_max, generator=generator, device=dev, dtype=dt)
        else:
            if tuple(x_init.shape) != shape:
                raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
            x = x_init
        ts = self.timesteps(steps, t_min, t_max, device=x.device)
        for j in range(int(steps)):
            if return_x0 and j == steps - 1 and float(t_min) == 0.0:
                return self.denoiser(x, ts[j], cond)
            x = self.transition(x, ts[j], ts[j + 1], cond).sample(generator)
        return x


class DDIM(Sampler):
    """DDIM(eta) step; ``eta = 1`` is the DDPM ancestral step, ``eta = 0`` is deterministic."""

    def __init__(self, denoiser, eta: float = 0.0, spacing: str | None = None) -> None:
        super().__init__(denoiser, spacing)
        if eta < 0:
            raise ValueError(f"DDIM: eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def transition(self, x_t, t, s, cond=None) -> GaussianKernel:
        t, s, c = self._coefficients(x_t, t, s)
        x0 = self.denoiser(x_t, t, cond)
        c2 = self.eta**2 * c["sg_s"] ** 2 * c["one_minus_e"]
        a_t, sg_t, a_s = bcast(c["a_t"], x_t), bcast(c["sg_t"], x_t), bcast(c["a_s"], x_t)
        k = bcast(torch.sqrt(c["sg_s"] ** 2 - c2), x_t)
        mean = a_s * x0 + k * (x_t - a_t * x0) / sg_t
        return GaussianKernel(mean, bcast(c2, x_t))


class DDPM(Sampler):
    """Ancestral DDPM step: the Gaussian posterior ``q(x_s | x_t, x_0 = D(x_t, t))``."""

    def transition(self, x_t, t, s, cond=None) -> GaussianKernel:
        t, s, c = self._coefficients(x_t, t, s)
        x0 = self.denoiser(x_t, t, cond)
        w_x = bcast(c["a_s"] / c["a_t"] * c["e"], x_t)
        w_0 = bcast(c["a_s"] * c["one_minus_e"], x_t)
        return GaussianKernel(w_x * x_t + w_0 * x0, bcast(c["sg_s"] ** 2 * c["one_minus_e"], x_t))


class EulerMaruyama(Sampler):
    """Euler–Maruyama step of the reverse SDE ``dx = (f x - g^2 score) dt + g dW``.

    Uses ``spacing="log_snr"`` by default: the step's variance relative to ``sigma_t^2`` is
    ``|d lambda|``, so a uniform-``lambda`` grid keeps every step equally well resolved
    (with cosine VP, ``dlambda/dt`` diverges near ``t = 1`` and a uniform-``t`` grid blows
    up).
    """

    default_spacing = "log_snr"

    def transition(self, x_t, t, s, cond=None) -> GaussianKernel:
        t, s, c = self._coefficients(x_t, t, s)
        f, g2 = self.schedule.drift_diffusion(t.to(torch.float64))
        h = (t - s).to(torch.float64)
        x0 = self.denoiser(x_t, t, cond)
        score = (bcast(c["a_t"], x_t) * x0 - x_t) / bcast(c["sg_t"] ** 2, x_t)
        mean = x_t - bcast(h * f, x_t) * x_t + bcast(h * g2, x_t) * score
        return GaussianKernel(mean, bcast(g2 * h, x_t))


class Heun(Sampler):
    """Heun's second-order step of the probability-flow ODE (EDM Alg. 1); ``var = 0``."""

    def transition(self, x_t, t, s, cond=None) -> GaussianKernel:
        t, s, c = self._coefficients(x_t, t, s)
        r_t = bcast(c["sg_t"] / c["a_t"], x_t)
        r_s = bcast(c["sg_s"] / c["a_s"], x_t)
        a_s = bcast(c["a_s"], x_t)
        xs = x_t / bcast(c["a_t"], x_t)
        d1 = (xs - self.denoiser(x_t, t, cond)) / r_t
        x_euler = xs + (r_s - r_t) * d1
        d2 = (x_euler - self.denoiser(a_s * x_euler, s, cond)) / r_s
        mean = a_s * (xs + (r_s - r_t) * 0.5 * (d1 + d2))
        return GaussianKernel(mean, torch.zeros((), dtype=x_t.dtype, device=x_t.device))


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "euler_maruyama": EulerMaruyama, "heun": Heun}

__all__ = ["Sampler", "DDPM", "DDIM", "EulerMaruyama", "Heun", "SAMPLERS"]
