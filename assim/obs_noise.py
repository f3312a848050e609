"""Observation-noise models for :mod:`assim.obs` (re-exported there).

``log_prob(residual (N, m)) -> (N,)``, ``sample(shape, generator) -> shape``,
``covariance(m) -> (m, m)`` and ``marginal(index)`` (the noise of a sub-vector).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from assim.errors import InputError
from assim.rng import rand, randn

_LOG_2PI = math.log(2.0 * math.pi)


def _positive(name: str, v: Tensor) -> Tensor:
    if v.dim() > 1:
        raise InputError(f"{name} must be a scalar or a vector (m,), got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
        raise InputError(f"{name} must be finite and > 0, got {v.tolist()}")
    return v


class Noise:
    """Base class. ``size`` is ``None`` for a scalar (any ``m``) else ``m``."""

    size: int | None = None

    def _check(self, m: int) -> None:
        if self.size is not None and m != self.size:
            raise InputError(f"{self!r} is defined for {self.size} observations but {m} were given")

    def _dim(self, m: int | None) -> int:
        """``m`` (checked), or the noise's own size when ``m`` is None."""
        m = self.size if m is None else m
        if m is None:
            raise InputError("covariance of a scalar noise needs the number of observations m")
        self._check(m)
        return m

    def log_prob(self, residual: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, shape, generator=None, *, device=None, dtype=None) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def covariance(self, m: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal(self, index: Tensor) -> Noise:  # pragma: no cover - abstract
        raise NotImplementedError


class GaussianNoise(Noise):
    """``eps ~ N(0, R)``. Give exactly one of ``std`` / ``var`` (scalar: ``R = s^2 I``;
    vector ``(m,)``: diagonal ``R``) or ``R`` ``(m, m)`` (symmetric positive definite,
    checked with a Cholesky factorisation)."""

    def __init__(self, std=None, *, var=None, R=None) -> None:
        if sum(v is not None for v in (std, var, R)) != 1:
            raise InputError("GaussianNoise: give exactly one of std, var or R")
        self.chol: Tensor | None = None
        if R is not None:
            R = torch.as_tensor(R).to(torch.float64)
            if R.dim() != 2 or R.shape[0] != R.shape[1]:
                raise InputError(
                    f"observation noise covariance R must be square (m, m), got "
                    f"shape {tuple(R.shape)}"
                )
            if not bool(torch.isfinite(R).all()) or not torch.allclose(
                R, R.T, rtol=1e-6, atol=1e-10 * float(R.abs().max())
            ):
                raise InputError("observation noise covariance R must be finite and symmetric")
            L, info = torch.linalg.cholesky_ex(R)
            if int(info) != 0:
                lo = float(torch.linalg.eigvalsh(R.double()).min())
                raise InputError(
                    f"observation noise covariance R is not positive definite (smallest "
                    f"eigenvalue {lo:.3g})"
                )
            self.R, self.chol, self.var = R, L, torch.diagonal(R).clone()
            self.size = R.shape[0]
        else:
            name = "std" if std is not None else "var"
            v = _positive(
                f"observation noise {name}",
                torch.as_tensor(std if std is not None else var, dtype=torch.float64),
            )
            self.var = v**2 if std is not None else v
            self.R = None
            self.size = None if self.var.dim() == 0 else self.var.shape[0]
        self._cache: dict = {}

    @property
    def diagonal(self) -> bool:
        return self.R is None

    def _on(self, ref: Tensor) -> tuple[Tensor, Tensor | None]:
        key = (ref.dtype, str(ref.device))
        if key not in self._cache:
            L = None if self.chol is None else self.chol.to(ref.device, ref.dtype)
            self._cache[key] = (self.var.to(ref.device, ref.dtype), L)
        return self._cache[key]

    def covariance(self, m: int | None = None, *, dtype=None, device=None) -> Tensor:
        m = self._dim(m)
        C = self.R if self.R is not None else torch.diag(self.var.expand(m))
        return C.to(dtype=dtype or C.dtype, device=device)

    def std(self, m: int) -> Tensor:
        """Marginal standard deviations ``(m,)``."""
        self._check(m)
        return self.var.expand(m).sqrt()

    def log_prob(self, residual: Tensor) -> Tensor:
        """``log N(r; 0, R)`` per row of ``residual`` ``(N, m)``."""
        m = residual.shape[-1]
        self._check(m)
        var, L = self._on(residual)
        if L is None:
            v = var.expand(m)
            return -0.5 * ((residual**2 / v).sum(-1) + torch.log(v).sum() + m * _LOG_2PI)
        z = torch.linalg.solve_triangular(L, residual.reshape(-1, m).T, upper=False).T
        logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
        out = -0.5 * ((z**2).sum(-1) + logdet + m * _LOG_2PI)
        return out.reshape(residual.shape[:-1])

    def sample(self, shape, generator=None, *, device=None, dtype=None) -> Tensor:
        """``eps`` of the given ``shape`` (last axis: the ``m`` observations)."""
        shape = tuple(shape)
        self._check(shape[-1])
        eps = randn(shape, generator, device=device, dtype=dtype)
        var, L = self._on(eps)
        return eps * var.sqrt() if L is None else eps @ L.T

    def marginal(self, index: Tensor) -> GaussianNoise:
        index = torch.as_tensor(index, dtype=torch.long)
        if self.R is not None:
            return GaussianNoise(R=self.R[index][:, index])
        return self if self.size is None else GaussianNoise(var=self.var[index])

    def __repr__(self) -> str:
        if self.R is not None:
            return f"GaussianNoise(R: {self.size}x{self.size})"
        return f"GaussianNoise(var={self.var.tolist()})"


def standard_gamma(alpha: Tensor, generator=None) -> Tensor:
    """``Gamma(alpha, 1)`` draws with an explicit generator (Marsaglia & Tsang 2000,
    with the ``U^{1/alpha}`` boost for ``alpha < 1``); ``alpha`` sets shape/device/dtype."""
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    todo = torch.ones_like(alpha, dtype=torch.bool)
    while bool(todo.any()):
        z = randn(alpha.shape, generator, device=alpha.device, dtype=alpha.dtype)
        u = rand(alpha.shape, generator, device=alpha.device, dtype=alpha.dtype)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        new = todo & ok
        out = torch.where(new, d * v, out)
        todo = todo & ~ok
    if bool(boost.any()):
        u = rand(alpha.shape, generator, device=alpha.device, dtype=alpha.dtype)
        out = torch.where(boost, out * u ** (1.0 / alpha), out)
    return out


class StudentTNoise(Noise):
    """Independent Student-t noise per observation: ``eps_j = scale_j * T_j``,
    ``T_j ~ t(df)``. ``scale`` scalar or ``(m,)``, ``df > 0``. Heavy tails make the
    particle filter robust to outliers. ``covariance`` is ``scale^2 df / (df - 2)``
    (``df > 2``), the Gaussian moment match used by ensemble Kalman filters."""

    def __init__(self, scale, df: float) -> None:
        s = _positive("Student-t noise scale", torch.as_tensor(scale, dtype=torch.float64))
        if not (math.isfinite(df) and df > 0):
            raise InputError(f"Student-t noise df must be finite and > 0, got {df!r}")
        self.scale, self.df = s, float(df)
        self.size = None if s.dim() == 0 else s.shape[0]

    def log_prob(self, residual: Tensor) -> Tensor:
        m = residual.shape[-1]
        self._check(m)
        s = self.scale.to(residual.device, residual.dtype).expand(m)
        nu = self.df
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        z = residual / s
        lp = const - torch.log(s) - (nu + 1) / 2 * torch.log1p(z * z / nu)
        return lp.sum(-1)

    def sample(self, shape, generator=None, *, device=None, dtype=None) -> Tensor:
        shape = tuple(shape)
        self._check(shape[-1])
        z = randn(shape, generator, device=device, dtype=dtype)
        g = standard_gamma(torch.full_like(z, self.df / 2), generator)
        return z / torch.sqrt(2.0 * g / self.df) * self.scale.to(z.device, z.dtype)

    def covariance(self, m: int | None = None, *, dtype=None, device=None) -> Tensor:
        m = self._dim(m)
        if self.df <= 2:
            raise InputError(f"Student-t noise with df={self.df} <= 2 has no finite covariance")
        v = self.scale.expand(m) ** 2 * self.df / (self.df - 2)
        return torch.diag(v).to(dtype=dtype or v.dtype, device=device)

    def std(self, m: int) -> Tensor:
        return torch.sqrt(torch.diagonal(self.covariance(m)))

    def marginal(self, index: Tensor) -> StudentTNoise:
        if self.size is None:
            return self
        return StudentTNoise(self.scale[torch.as_tensor(index, dtype=torch.long)], self.df)

    def __repr__(self) -> str:
        return f"StudentTNoise(scale={self.scale.tolist()}, df={self.df})"
