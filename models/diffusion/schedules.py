"""Noise schedules ``t -> (alpha_t, sigma_t)`` with ``x_t = alpha_t x_0 + sigma_t eps``.

Continuous diffusion time ``t in [0, 1]``; noise grows with ``t``. Every schedule is
defined by its log signal-to-noise ratio ``lambda(t) = log(alpha_t^2 / sigma_t^2)``
(strictly decreasing, finite at both ends) and a flag saying whether it is
variance preserving (VP: ``alpha^2 + sigma^2 = 1``) or variance exploding
(VE: ``alpha = 1``). Everything else follows:

- ``alpha, sigma``: VP ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``;
  VE ``alpha = 1``, ``sigma = exp(-lambda / 2)``.
- the SDE ``dx = f(t) x dt + g(t) dW`` with ``f = d log alpha / dt`` and
  ``g^2 = d sigma^2/dt - 2 f sigma^2 = -sigma^2 dlambda/dt`` (Kingma et al. 2021, VDM).
- inverses ``t_of_log_snr`` / ``t_of_sigma_ratio`` so that a reverse chain can stop at a
  given noise level ``q = sigma_t / alpha_t`` (the noise of the scaled state
  ``x_t / alpha_t = x_0 + q eps``).

Inputs ``t`` may be Python floats or tensors of any shape; outputs have the shape,
dtype and device of ``t`` (floats become tensors of the default dtype).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _as_tensor(t: float | Tensor) -> Tensor:
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.get_default_dtype())


class Schedule(ABC):
    """Base class: subclasses give ``log_snr``, its derivative and its inverse."""

    variance_preserving: bool = True

    @abstractmethod
    def log_snr(self, t: float | Tensor) -> Tensor:
        """``lambda(t) = log(alpha_t^2 / sigma_t^2)``, decreasing in ``t``."""

    @abstractmethod
    def dlog_snr(self, t: float | Tensor) -> Tensor:
        """``d lambda / dt`` (negative)."""

    @abstractmethod
    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        """Unclamped inverse of ``log_snr``."""

    def t_of_log_snr(self, lam: float | Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`, clamped to ``[0, 1]`` (levels outside the range of
        the schedule map to the nearest end)."""
        lam = _as_tensor(lam)
        return self._t_of_log_snr(lam).clamp(0.0, 1.0)

    def t_of_sigma_ratio(self, ratio: float | Tensor) -> Tensor:
        """The time at which ``sigma_t / alpha_t = ratio`` (clamped to ``[0, 1]``).

        The reverse chain stopped at this time leaves ``x_t / alpha_t = x_0 + ratio * eps``.
        """
        ratio = _as_tensor(ratio)
        if torch.any(ratio <= 0):
            raise ValueError(f"t_of_sigma_ratio: ratio must be > 0, got {ratio}")
        return self.t_of_log_snr(-2.0 * torch.log(ratio))

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)``, each with the shape of ``t``."""
        lam = self.log_snr(t)
        if self.variance_preserving:
            return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return torch.ones_like(lam), torch.exp(-0.5 * lam)

    __call__ = alpha_sigma

    def sigma_ratio(self, t: float | Tensor) -> Tensor:
        """``sigma_t / alpha_t = exp(-lambda / 2)``: the noise std of ``x_t / alpha_t``."""
        return torch.exp(-0.5 * self.log_snr(t))

    def drift_diffusion(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t), g(t)^2)`` of the forward SDE ``dx = f x dt + g dW``.

        ``g^2 = -sigma^2 lambda'``; ``f = sigma^2 lambda' / 2`` (VP) or ``0`` (VE).
        """
        dlam = self.dlog_snr(t)
        _, sigma = self.alpha_sigma(t)
        g2 = -(sigma**2) * dlam
        f = 0.5 * sigma**2 * dlam if self.variance_preserving else torch.zeros_like(dlam)
        return f, g2

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class CosineVP(Schedule):
    """Cosine VP schedule (Nichol & Dhariwal 2021) with a bounded log-SNR.

    ``lambda(t) = -2 log tan(a t + b)`` with ``b = arctan(exp(-lambda_max / 2))`` and
    ``a = arctan(exp(-lambda_min / 2)) - b``, so ``lambda(0) = log_snr_max`` and
    ``lambda(1) = log_snr_min`` (the "shifted/truncated cosine" of Kingma & Gao 2023).
    Defaults give ``sigma_0 ~ 0.0025`` and ``sigma_1 / alpha_1 ~ 150``.
    """

    variance_preserving = True

    def __init__(self, log_snr_min: float = -10.0, log_snr_max: float = 12.0) -> None:
        if not log_snr_min < log_snr_max:
            raise ValueError(
                f"CosineVP: need log_snr_min < log_snr_max, got {log_snr_min}, {log_snr_max}"
            )
        self.log_snr_min = float(log_snr_min)
        self.log_snr_max = float(log_snr_max)
        self._b = math.atan(math.exp(-0.5 * log_snr_max))
        self._a = math.atan(math.exp(-0.5 * log_snr_min)) - self._b

    def log_snr(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))

    def dlog_snr(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        return -4.0 * self._a / torch.sin(2.0 * (self._a * t + self._b))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-0.5 * lam)) - self._b) / self._a


class LinearVP(Schedule):
    """Linear-beta VP schedule (DDPM, Ho et al. 2020; VP-SDE, Song et al. 2021).

    ``beta(u) = beta_min + u (beta_max - beta_min)``, ``alpha^2 = exp(-B(u))`` with
    ``B(u) = int_0^u beta``, evaluated at ``u = eps + (1 - eps) t`` so that
    ``sigma_0 > 0`` (``eps = 1e-5`` gives ``sigma_0 ~ 1e-3``).
    """

    variance_preserving = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5) -> None:
        if not (0 < beta_min < beta_max) or not (0 < eps < 1):
            raise ValueError(
                "LinearVP: need 0 < beta_min < beta_max and 0 < eps < 1, got "
                f"beta_min={beta_min}, beta_max={beta_max}, eps={eps}"
            )
        self.beta_min, self.beta_max, self.eps = float(beta_min), float(beta_max), float(eps)

    def _u(self, t: float | Tensor) -> Tensor:
        return self.eps + (1.0 - self.eps) * _as_tensor(t)

    def _big_b(self, u: Tensor) -> Tensor:
        return self.beta_min * u + 0.5 * (self.beta_max - self.beta_min) * u**2

    def log_snr(self, t: float | Tensor) -> Tensor:
        # alpha^2 / sigma^2 = 1 / (exp(B) - 1)
        return -torch.log(torch.expm1(self._big_b(self._u(t))))

    def dlog_snr(self, t: float | Tensor) -> Tensor:
        u = self._u(t)
        beta = self.beta_min + (self.beta_max - self.beta_min) * u
        return -(1.0 - self.eps) * beta / (-torch.expm1(-self._big_b(u)))

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        big_b = torch.log1p(torch.exp(-lam))
        d = self.beta_max - self.beta_min
        u = (-self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * big_b)) / d
        return (u - self.eps) / (1.0 - self.eps)


class EDM(Schedule):
    """EDM / VE schedule (Karras et al. 2022): ``alpha = 1``,
    ``sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``.

    A uniform grid in ``t`` is exactly the EDM ``rho``-spacing in ``sigma``.
    """

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        if not (0 < sigma_min < sigma_max) or rho <= 0:
            raise ValueError(
                "EDM: need 0 < sigma_min < sigma_max and rho > 0, got "
                f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}"
            )
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self._lo = sigma_min ** (1.0 / rho)
        self._span = sigma_max ** (1.0 / rho) - self._lo

    def sigma(self, t: float | Tensor) -> Tensor:
        return (self._lo + _as_tensor(t) * self._span) ** self.rho

    def log_snr(self, t: float | Tensor) -> Tensor:
        return -2.0 * self.rho * torch.log(self._lo + _as_tensor(t) * self._span)

    def dlog_snr(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        return -2.0 * self.rho * self._span / (self._lo + t * self._span)

    def _t_of_log_snr(self, lam: Tensor) -> Tensor:
        return (torch.exp(-0.5 * lam / self.rho) - self._lo) / self._span


VE = EDM

__all__ = ["Schedule", "CosineVP", "LinearVP", "EDM", "VE"]
