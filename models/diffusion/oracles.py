"""Exact denoisers for Gaussian and Gaussian-mixture data: the oracles for tests.

For ``x_0 ~ N(mu, Sigma)`` and ``x_t = alpha x_0 + sigma eps`` the posterior is Gaussian:

    E[x_0 | x_t]   = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x_t - alpha mu)
                   = mu + U diag(alpha l / (alpha^2 l + sigma^2)) U^T (x_t - alpha mu)
    Cov[x_0 | x_t] = U diag(sigma^2 l / (alpha^2 l + sigma^2)) U^T,

with the eigendecomposition ``Sigma = U diag(l) U^T`` computed once. For a mixture
``sum_k w_k N(mu_k, Sigma_k)`` the posterior mean is ``sum_k r_k(x_t) E_k[x_0 | x_t]`` with
responsibilities ``r_k ∝ w_k N(x_t; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``.

Both follow the denoiser interface ``forward(x_t (B, *S), t, cond) -> (B, *S)`` and carry a
``schedule``, so every sampler runs on them unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.diffusion.denoisers import as_time, score_from_x0
from models.diffusion.schedules import Schedule


def _eigh(cov: Tensor, name: str) -> tuple[Tensor, Tensor]:
    cov64 = cov.to(torch.float64)
    if not torch.allclose(cov64, cov64.transpose(-1, -2), atol=1e-10, rtol=1e-8):
        raise ValueError(f"{name} must be symmetric")
    lam, u = torch.linalg.eigh(0.5 * (cov64 + cov64.transpose(-1, -2)))
    if torch.any(lam < -1e-8 * lam.abs().max().clamp_min(1.0)):
        raise ValueError(f"{name} must be positive semi-definite (min eigenvalue {lam.min()})")
    return lam.clamp_min(0.0).to(cov.dtype), u.to(cov.dtype)


def _alpha_sigma(schedule: Schedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha, sigma`` of shape ``(B, 1)`` in ``x``'s dtype."""
    a, s = schedule(as_time(t, x).to(torch.float64).expand(x.shape[0]))
    return a.to(x.dtype)[:, None], s.to(x.dtype)[:, None]


class GaussianDenoiser(nn.Module):
    """Exact ``E[x_0 | x_t]`` for ``x_0 ~ N(mu + A cond, Sigma)``.

    Args:
        mu: mean, shape ``S`` (the event shape; ``D = prod(S)``).
        Sigma: full covariance ``(D, D)``, symmetric positive semi-definite.
        schedule: the diffusion :class:`Schedule`.
        A: optional ``(D, C)``: the mean becomes ``mu + cond.flatten(1) @ A^T`` for
            ``cond`` of shape ``(B, *C)`` with ``prod(C) = C``. This is the linear-Gaussian
            transition ``p(x_{k+1} | x_k) = N(A x_k + b, Q)`` with ``mu = b, Sigma = Q``.
    """

    def __init__(self, mu: Tensor, Sigma: Tensor, schedule: Schedule, A: Tensor | None = None):
        super().__init__()
        d = mu.numel()
        if Sigma.shape != (d, d):
            raise ValueError(
                f"Sigma must have shape ({d}, {d}) for mu of {d} entries, got {tuple(Sigma.shape)}"
            )
        if A is not None and (A.ndim != 2 or A.shape[0] != d):
            raise ValueError(f"A must have shape ({d}, C), got {tuple(A.shape)}")
        self.schedule = schedule
        self.event_shape = tuple(mu.shape)
        lam, u = _eigh(Sigma, "Sigma")
        self.register_buffer("mu", mu.reshape(d).clone())
        self.register_buffer("Sigma", Sigma.clone())
        self.register_buffer("eigvals", lam)
        self.register_buffer("eigvecs", u)
        self.register_buffer("A", None if A is None else A.clone())
        self.sigma_data = float(torch.sqrt(lam.sum() / d))

    def mean(self, cond: Tensor | None = None, batch: int | None = None) -> Tensor:
        """Mean of ``x_0``: ``(D,)`` without ``A``, else ``(B, D)``."""
        if self.A is None:
            return self.mu
        if cond is None:
            raise ValueError("GaussianDenoiser with A needs `cond` (B, C)")
        c = cond.reshape(cond.shape[0], -1).to(self.A.dtype)
        if c.shape[1] != self.A.shape[1]:
            raise ValueError(
                f"cond has {c.shape[1]} entries per sample, A expects {self.A.shape[1]}"
            )
        if batch is not None and c.shape[0] != batch:
            raise ValueError(f"cond has leading size {c.shape[0]}, x_t has {batch}")
        return self.mu + c @ self.A.T

    def forward(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """``E[x_0 | x_t]``, shape ``(B, *S)``."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1)
        alpha, sigma = _alpha_sigma(self.schedule, t, x)
        mu = self.mean(cond, b).to(x.dtype)
        u, lam = self.eigvecs.to(x.dtype), self.eigvals.to(x.dtype)
        gain = alpha * lam / (alpha**2 * lam + sigma**2)
        z = (x - alpha * mu) @ u
        return (mu + (gain * z) @ u.T).reshape(x_t.shape)

    def score(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        return score_from_x0(self, x_t, t, cond)

    def posterior_cov(self, t: float | Tensor) -> Tensor:
        """``Cov[x_0 | x_t]``: ``(D, D)`` for scalar ``t``, ``(B, D, D)`` for ``t`` ``(B,)``."""
        dtype = self.eigvals.dtype
        tt = torch.as_tensor(t, dtype=torch.float64, device=self.eigvals.device)
        a, s = self.schedule(tt)
        a, s = a.to(dtype)[..., None], s.to(dtype)[..., None]
        v = s**2 * self.eigvals / (a**2 * self.eigvals + s**2)
        return (self.eigvecs * v[..., None, :]) @ self.eigvecs.T

    def sample_x0(
        self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """Exact draws ``x_0 ~ N(mean, Sigma)``, shape ``(n, *S)``."""
        eps = torch.randn(
            n, self.mu.numel(), generator=generator, device=self.mu.device, dtype=self.mu.dtype
        )
        x = self.mean(cond, n) + (eps * self.eigvals.sqrt()) @ self.eigvecs.T
        return x.reshape(n, *self.event_shape)


class GaussianMixtureDenoiser(nn.Module):
    """Exact ``E[x_0 | x_t]`` for ``x_0 ~ sum_k w_k N(mu_k, Sigma_k)``; ``cond`` is ignored.

    Args:
        weights: ``(K,)`` nonnegative (normalised here).
        mus: ``(K, *S)``.
        Sigmas: ``(K, D, D)`` with ``D = prod(S)``.
        schedule: the diffusion :class:`Schedule`.
    """

    def __init__(self, weights: Tensor, mus: Tensor, Sigmas: Tensor, schedule: Schedule):
        super().__init__()
        k = weights.shape[0]
        d = mus[0].numel()
        if weights.ndim != 1 or mus.shape[0] != k or Sigmas.shape != (k, d, d):
            raise ValueError(
                f"expected weights (K,), mus (K, *S), Sigmas (K, D, D); got {tuple(weights.shape)},"
                f" {tuple(mus.shape)}, {tuple(Sigmas.shape)}"
            )
        if torch.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("weights must be nonnegative with a positive sum")
        self.schedule = schedule
        self.event_shape = tuple(mus.shape[1:])
        lam, u = _eigh(Sigmas, "Sigmas")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("mus", mus.reshape(k, d).clone())
        self.register_buffer("eigvals", lam)  # (K, D)
        self.register_buffer("eigvecs", u)  # (K, D, D)
        second = (lam.sum(1) + (mus.reshape(k, d) ** 2).sum(1)) / d
        self.sigma_data = float(torch.sqrt((self.weights * second).sum()))

    def _parts(self, x_t: Tensor, t) -> tuple[Tensor, Tensor, Tensor]:
        """Log-responsibilities ``(B, K)``, per-component posterior means ``(B, K, D)``."""
        b = x_t.shape[0]
        x = x_t.reshape(b, -1)
        alpha, sigma = _alpha_sigma(self.schedule, t, x)  # (B, 1)
        alpha, sigma = alpha[:, :, None], sigma[:, :, None]  # (B, 1, 1)
        lam = self.eigvals.to(x.dtype)[None]  # (1, K, D)
        u = self.eigvecs.to(x.dtype)
        mus = self.mus.to(x.dtype)[None]  # (1, K, D)
        z = torch.einsum("bkd,kde->bke", x[:, None, :] - alpha * mus, u)
        v = alpha**2 * lam + sigma**2
        d = x.shape[1]
        log_n = -0.5 * ((z**2 / v).sum(-1) + v.log().sum(-1) + d * math.log(2 * math.pi))
        log_r = torch.log_softmax(self.weights.to(x.dtype).log() + log_n, dim=1)
        m = mus + torch.einsum("bke,kde->bkd", alpha * lam / v * z, u)
        return log_r, m, x

    def responsibilities(self, x_t: Tensor, t: float | Tensor) -> Tensor:
        """``p(k | x_t)``, shape ``(B, K)``."""
        return self._parts(x_t, t)[0].exp()

    def forward(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        """``E[x_0 | x_t] = sum_k r_k E_k[x_0 | x_t]``, shape ``(B, *S)``."""
        log_r, m, _ = self._parts(x_t, t)
        return (log_r.exp()[..., None] * m).sum(1).reshape(x_t.shape)

    def score(self, x_t: Tensor, t: float | Tensor, cond: Tensor | None = None) -> Tensor:
        return score_from_x0(self, x_t, t, cond)

    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Exact draws ``(x_0 (n, *S), component labels (n,))``."""
        dev = self.mus.device
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(
            n, self.mus.shape[1], generator=generator, device=dev, dtype=self.mus.dtype
        )
        scaled = eps * self.eigvals[labels].sqrt()
        x = self.mus[labels] + torch.einsum("ne,nde->nd", scaled, self.eigvecs[labels])
        return x.reshape(n, *self.event_shape), labels


@torch.no_grad()
def chain_moments(
    sampler, dim: int, steps: int, t_min: float = 0.0, t_max: float = 1.0, return_x0: bool = True
) -> tuple[Tensor, Tensor]:
    """Exact mean ``(D,)`` and covariance ``(D, D)`` of ``sampler.sample`` when its denoiser
    is affine in ``x_t`` (a :class:`GaussianDenoiser` without ``cond``), in float64.

    Every step is then ``x_s = J x_t + b + sqrt(v) eps``, so a Gaussian stays Gaussian:
    ``m <- J m + b``, ``C <- J C J^T + v I``. ``J`` is read off by applying the step to
    ``m`` and ``m + e_i`` (exact for affine maps). This gives the discretisation error of a
    sampler without Monte-Carlo noise.
    """
    ref = next(iter(sampler.denoiser.buffers()), None)
    dev = ref.device if ref is not None else None
    eye = torch.eye(dim, dtype=torch.float64, device=dev)
    m = torch.zeros(dim, dtype=torch.float64, device=dev)
    cov = float(sampler.prior_std(t_max)) ** 2 * eye
    ts = sampler.timesteps(steps, t_min, t_max, device=dev)
    for j in range(int(steps)):
        pts = torch.cat([m[None], m[None] + eye])
        if return_x0 and j == steps - 1 and float(t_min) == 0.0:
            out, var = sampler.denoiser(pts, ts[j]), torch.zeros((), dtype=torch.float64)
        else:
            k = sampler.transition(pts, ts[j], ts[j + 1])
            out, var = k.mean, k.var
        jac = (out[1:] - out[0]).T
        m, cov = out[0], jac @ cov @ jac.T + var.reshape(()) * eye
    return m, cov


__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser", "chain_moments"]
