"""Gaussian-process noise on a periodic grid (Matérn spectral prior, sampled by FFT).

Function-space diffusion (Lim et al. 2023, "Score-based diffusion models in function
space"; Kerrigan et al. 2023, "Diffusion generative models in infinite dimensions")
replaces white noise by a Gaussian process so that the forward process, and hence the
learned model, is defined on functions rather than on one grid.

**Prior.** On a periodic box of physical side lengths ``L = (L_1, .., L_d)`` a stationary
field is ``u(x) = sum_k a_k exp(2 pi i k.x)`` over wave vectors ``k = (m_1/L_1, ..)``
(cycles per unit length, ``m`` integer) with independent ``a_k``, ``E|a_k|^2 = S(k)``,
``a_{-k} = conj(a_k)``. The Matérn spectral density (Rasmussen & Williams 2006, eq. 4.15)

    S(k) ∝ (2 nu / ell^2 + 4 pi^2 |k|^2)^(-(nu + d/2))

is normalised so that the *continuum* variance ``sum_k S(k) = variance`` (the sum runs
over all wave vectors up to a fixed physical cut-off, not up to the grid's Nyquist
frequency). ``S`` depends on physical wave numbers only, so the same process is sampled
on any grid: a grid of ``n = (n_1, .., n_d)`` points keeps the modes it resolves.

**Grid covariance.** With the unitary DFT ``F``, the grid covariance is
``C = F^H diag(lam) F`` with ``lam_k = prod(n) S(k)`` (diagonal in Fourier space).
Hence exact sampling ``u = F^H (sqrt(lam) F xi)`` for white ``xi``, whitening
``w = F^H (F u / sqrt(lam))``, and ``log N(u; m, v C) = log N(w(u); w(m), v I) -
0.5 sum log lam``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.diffusion.kernel import GaussianKernel

_CUTOFF = {1: 4096, 2: 512, 3: 64}  # modes per axis of the continuum normalisation sum


@dataclass(frozen=True)
class MaternGP:
    """Stationary Matérn GP on a periodic box, defined in physical units.

    Args:
        lengths: physical side lengths ``L`` of the box, one per grid axis.
        lengthscale: ``ell`` (physical units).
        nu: smoothness (``> 0``; the spectrum decays like ``|k|^-(2 nu + d)``).
        variance: continuum point variance ``C(0)``.
    """

    lengths: tuple[float, ...]
    lengthscale: float = 1.0
    nu: float = 1.5
    variance: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(float(v) for v in self.lengths))
        if not self.lengths or len(self.lengths) > 3 or min(self.lengths) <= 0:
            raise ValueError(f"MaternGP: lengths must be 1-3 positive numbers, got {self.lengths}")
        if self.lengthscale <= 0 or self.nu <= 0 or self.variance <= 0:
            raise ValueError(
                "MaternGP: lengthscale, nu and variance must be > 0, got "
                f"{self.lengthscale}, {self.nu}, {self.variance}"
            )

    @property
    def ndim(self) -> int:
        return len(self.lengths)

    def _density(self, k2: Tensor) -> Tensor:
        a = 2.0 * self.nu / self.lengthscale**2
        return (a + 4.0 * math.pi**2 * k2) ** (-(self.nu + self.ndim / 2.0))

    def _k2(self, shape: tuple[int, ...], device=None) -> Tensor:
        """``|k|^2`` on the DFT frequency grid of ``shape`` (float64, shape ``shape``)."""
        axes = [
            torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device) / length
            for n, length in zip(shape, self.lengths, strict=True)
        ]
        grids = torch.meshgrid(*axes, indexing="ij")
        return sum(g**2 for g in grids)

    def _norm(self) -> float:
        """``variance / sum_k density(k)`` over the continuum cut-off grid."""
        shape = (_CUTOFF[self.ndim],) * self.ndim
        return self.variance / float(self._density(self._k2(shape)).sum())

    def spectrum(self, shape: tuple[int, ...], device=None) -> Tensor:
        """``S(k)`` on the DFT grid of ``shape``: variance of each Fourier mode (float64)."""
        self._check(shape)
        return self._norm() * self._density(self._k2(tuple(shape), device))

    def eigenvalues(self, shape: tuple[int, ...], device=None) -> Tensor:
        """``lam_k = prod(shape) S(k)``: eigenvalues of the grid covariance (float64)."""
        return math.prod(shape) * self.spectrum(shape, device)

    def covariance(self, shape: tuple[int, ...]) -> Tensor:
        """The dense grid covariance ``C`` ``(D, D)``, ``D = prod(shape)`` (small grids only;
        ``C_ij = sum_k S(k) cos(2 pi k.(x_i - x_j))`` evaluated through the DFT)."""
        lam = self.eigenvalues(shape)
        eye = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
        return self._apply(eye, lam).reshape(len(eye), -1)

    def _check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != self.ndim:
            raise ValueError(
                f"MaternGP on a {self.ndim}-D box (lengths {self.lengths}) cannot act on a grid "
                f"of shape {tuple(shape)}"
            )

    def _apply(self, x: Tensor, mult: Tensor) -> Tensor:
        """``F^H diag(mult) F x`` over the last ``ndim`` axes (real in, real out)."""
        dims = tuple(range(-self.ndim, 0))
        xf = torch.fft.fftn(x.to(torch.float64), dim=dims, norm="ortho")
        return torch.fft.ifftn(xf * mult, dim=dims, norm="ortho").real

    def sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draws of shape ``shape = (*batch, *grid)``: ``C^{1/2} xi`` with white ``xi``."""
        grid = tuple(shape[-self.ndim :])
        xi = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
        return self._apply(xi, self.eigenvalues(grid, device).sqrt()).to(dtype)

    def whiten(self, x: Tensor) -> Tensor:
        """``C^{-1/2} x`` over the last ``ndim`` axes (same shape and dtype)."""
        lam = self.eigenvalues(tuple(x.shape[-self.ndim :]), x.device)
        return self._apply(x, lam.rsqrt()).to(x.dtype)

    def colour(self, x: Tensor) -> Tensor:
        """``C^{1/2} x`` (inverse of :meth:`whiten`)."""
        lam = self.eigenvalues(tuple(x.shape[-self.ndim :]), x.device)
        return self._apply(x, lam.sqrt()).to(x.dtype)

    def apply_cov(self, x: Tensor) -> Tensor:
        """``C x`` (e.g. to turn a gradient into a covariance-preconditioned shift)."""
        lam = self.eigenvalues(tuple(x.shape[-self.ndim :]), x.device)
        return self._apply(x, lam).to(x.dtype)

    def log_det(self, shape: tuple[int, ...]) -> float:
        """``log det C`` of the grid covariance."""
        return float(self.eigenvalues(tuple(shape)).log().sum())

    def marginal_variance(self, shape: tuple[int, ...]) -> float:
        """``C_ii`` on this grid (``<= variance``: modes beyond Nyquist are dropped)."""
        return float(self.spectrum(tuple(shape)).sum())


@dataclass(frozen=True)
class GPKernel(GaussianKernel):
    """Gaussian kernel ``N(mean, v C)`` whose covariance is a scalar ``v`` (``var``,
    per particle ``(N, 1, ..)`` or scalar) times the GP grid covariance ``C``.

    Same interface as :class:`GaussianKernel` (``mean``, ``var``, ``sample``,
    ``log_prob``, ``deterministic``, ``to``). ``log_prob`` is exact: it whitens with
    ``C^{-1/2}`` and adds ``-0.5 log det C``. Code that reads ``var`` as a *diagonal*
    covariance (e.g. diagonal twisted proposals) sees ``v`` only; use
    :meth:`marginal_var` for the pointwise variance ``v C_ii`` and :meth:`cov_apply` for
    covariance-preconditioned mean shifts.
    """

    gp: MaternGP | None = None

    def _gp(self) -> MaternGP:
        if self.gp is None:
            raise ValueError("GPKernel needs its `gp` (a MaternGP)")
        return self.gp

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        if self.deterministic:
            return self.mean.clone()
        gp = self._gp()
        eps = gp.sample(
            tuple(self.mean.shape), generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.var.sqrt() * eps

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mean, v C)`` summed over the grid, shape ``(N,)``."""
        if torch.any(self.var <= 0):
            raise ValueError("log_prob of a deterministic (var = 0) GP transition is undefined")
        gp = self._gp()
        grid = tuple(self.mean.shape[-gp.ndim :])
        white = GaussianKernel(gp.whiten(self.mean), self.var)
        return white.log_prob(gp.whiten(x.to(self.mean.dtype))) - 0.5 * gp.log_det(grid)

    def marginal_var(self) -> Tensor:
        """Pointwise variance ``v C_ii`` (broadcastable to ``mean``)."""
        gp = self._gp()
        return self.var * gp.marginal_variance(tuple(self.mean.shape[-gp.ndim :]))

    def cov_apply(self, x: Tensor) -> Tensor:
        """``v C x``."""
        return self.var * self._gp().apply_cov(x)

    def to(self, *args, **kwargs) -> GPKernel:
        return GPKernel(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs), self.gp)


__all__ = ["MaternGP", "GPKernel"]
