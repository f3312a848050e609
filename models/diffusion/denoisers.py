"""The learned denoiser ``D(x_t, t, cond) ~ E[x_0 | x_t]`` with EDM preconditioning.

Karras et al. (2022), "Elucidating the design space of diffusion-based generative
models", Table 1, generalised to any schedule through the scaled variable
``x~ = x_t / alpha_t = x_0 + r eps`` with ``r = sigma_t / alpha_t``:

    D(x_t, t) = c_skip(r) x~ + c_out(r) F(c_in(r) x~, c_noise(r), cond)
    c_skip = s_d^2 / (r^2 + s_d^2),  c_out = r s_d / sqrt(r^2 + s_d^2),
    c_in = 1 / sqrt(r^2 + s_d^2),    c_noise = log(r) / 4,

where ``s_d = sigma_data`` and ``F`` is any backbone ``F(x_in, c_noise, cond) -> out``
with ``x_in`` and ``out`` of shape ``(B, *S)`` and ``c_noise`` of shape ``(B,)``.
Training minimises the denoising score-matching loss with EDM weighting
``lambda(r) = (r^2 + s_d^2) / (r s_d)^2`` (unit effective weight on ``F``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.diffusion.schedules import Schedule


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """``t`` as a tensor on ``x``'s device: a 0-d tensor or shape ``(B,)``.

    Raises ``ValueError`` when a batched ``t`` does not match ``x.shape[0]``.
    """
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(x.dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"t must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}"
        )
    if t.ndim == 1 and t.shape[0] == 1:
        t = t.reshape(())
    return t


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a scalar or ``(B,)`` coefficient to broadcast against ``x`` ``(B, *S)``,
    in ``x``'s dtype."""
    v = v.to(x.dtype)
    return v if v.ndim == 0 else v.reshape(-1, *([1] * (x.ndim - 1)))


def schedule_coefficients(schedule: Schedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` computed in float64 on ``t``'s device and broadcast
    against ``x`` in ``x``'s dtype."""
    alpha, sigma = schedule(t.to(torch.float64))
    return bcast(alpha, x), bcast(sigma, x)


class Denoiser(nn.Module):
    """A backbone wrapped with EDM preconditioning; ``forward`` returns ``x0_hat``.

    Args:
        backbone: ``F(x_in (B, *S), c_noise (B,), cond) -> (B, *S)``.
        schedule: the :class:`Schedule` of the diffusion.
        sigma_data: data standard deviation ``s_d`` (data are assumed standardised).
        t_dist: how :meth:`loss` draws diffusion times: ``"lognormal"`` (EDM:
            ``log r ~ N(p_mean, p_std^2)`` mapped to ``t`` through the schedule and clamped
            to ``[t_min, t_max]``) or ``"uniform"`` (``t ~ U(t_min, t_max)``).
        p_mean, p_std: parameters of the log-normal noise-level distribution.
        t_min, t_max: range of training times.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        sigma_data: float = 1.0,
        t_dist: str = "lognormal",
        p_mean: float = -1.2,
        p_std: float = 1.2,
        t_min: float = 0.0,
        t_max: float = 1.0,
    ) -> None:
        super().__init__()
        if t_dist not in ("lognormal", "uniform"):
            raise ValueError(f"Denoiser: t_dist must be 'lognormal' or 'uniform', got {t_dist!r}")
        if sigma_data <= 0:
            raise ValueError(f"Denoiser: sigma_data must be > 0, got {sigma_data}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"Denoiser: need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.backbone = backbone
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.t_dist = t_dist
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def preconditioning(self, ratio: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for noise ratios ``r = sigma / alpha``."""
        sd2 = self.sigma_data**2
        denom = ratio**2 + sd2
        return sd2 / denom, ratio * self.sigma_data / denom.sqrt(), denom.rsqrt(), ratio.log() / 4

    def forward(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """``x0_hat = E[x_0 | x_t]`` estimate, shape ``(B, *S)``; ``t`` scalar or ``(B,)``."""
        t = as_time(t, x_t)
        alpha, sigma = self.schedule(t.to(torch.float64))
        ratio = (sigma / alpha).expand(x_t.shape[0])
        c_skip, c_out, c_in, c_noise = (c.to(x_t.dtype) for c in self.preconditioning(ratio))
        x_s = x_t / bcast(alpha, x_t)
        out = self.backbone(bcast(c_in, x_t) * x_s, c_noise, cond)
        return bcast(c_skip, x_t) * x_s + bcast(c_out, x_t) * out

    def score(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """``grad log p_t(x_t) = (alpha_t x0_hat - x_t) / sigma_t^2`` (Tweedie)."""
        return score_from_x0(self, x_t, t, cond)

    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        """Draw ``n`` training times from ``t_dist``, shape ``(n,)`` (float64)."""
        if self.t_dist == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return self.t_min + (self.t_max - self.t_min) * u
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        t = self.schedule.t_of_sigma_ratio(torch.exp(self.p_mean + self.p_std * z))
        return t.clamp(self.t_min, self.t_max)

    def loss(
        self,
        x0: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """EDM-weighted denoising score-matching loss (scalar).

        ``E_t E_eps[ lambda(r_t) ||D(alpha_t x0 + sigma_t eps, t) - x0||^2 ] / prod(S)``
        with ``t`` drawn from ``t_dist`` (or given, shape ``(B,)``).
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, generator=generator, device=x0.device)
        t = as_time(t, x0).expand(b)
        alpha, sigma = schedule_coefficients(self.schedule, t, x0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = alpha * x0 + sigma * eps
        ratio = (sigma / alpha).flatten()
        weight = (ratio**2 + self.sigma_data**2) / (ratio * self.sigma_data) ** 2
        err = (self(x_t, t, cond) - x0) ** 2
        return (bcast(weight, x0) * err).flatten(1).mean(1).mean()


def score_from_x0(denoiser, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
    """Score ``(alpha_t D(x_t, t) - x_t) / sigma_t^2`` of any denoiser with a schedule."""
    t = as_time(t, x_t)
    alpha, sigma = schedule_coefficients(denoiser.schedule, t, x_t)
    return (alpha * denoiser(x_t, t, cond) - x_t) / sigma**2


__all__ = ["Denoiser", "score_from_x0", "as_time", "bcast", "schedule_coefficients"]
