"""The observation as guidance sees it: ``y = f(H x) + eps`` in observation space.

Split from :mod:`assim.guidance` (which re-exports :class:`ObsSpace`). Every covariance
is formed in observation space, ``R + diag(a) H diag(w) H^T diag(a)`` with ``w`` a
per-state-element variance and ``a`` the pointwise derivative; diagonal when the rows
of ``H`` have disjoint supports and ``R`` is diagonal (identity, subsets, coarsening,
pointwise maps of those), dense ``(m, m)`` with Cholesky factorisations otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.obs import _FUNCS, Operator, Pointwise, _Rows
from assim.obs_noise import GaussianNoise, StudentTNoise
from assim.rng import randn

__all__ = ["ObsSpace"]

_LOG_2PI = math.log(2.0 * math.pi)


def _decompose(op: Operator) -> tuple[Operator, Tensor | None, list[str]]:
    """``h = f_k o ... o f_1 o rows o L``: the linear part ``L``, selected rows, functions."""
    if isinstance(op, _Rows):
        lin, rows, funcs = _decompose(op.base)
        return lin, op.rows if rows is None else rows[op.rows], funcs
    if isinstance(op, Pointwise):
        return op.base, None, list(op.funcs)
    if op.linear:
        return op, None, []
    raise InputError(
        f"guided proposals need a linear or pointwise observation operator, got {op!r}; "
        "use twist='dps' (gradient guidance) or twist='none'"
    )


class ObsSpace:
    """The observation ``y = f(H x) + eps`` seen by guidance, for one state shape.

    ``H`` ``(m, d)`` is the linear part of the operator (its matrix; for a pointwise
    operator the base selection), ``f`` the elementwise map (identity when linear) and
    ``R`` the noise covariance (Student-t: its Gaussian moment match, used only inside
    proposals and twists; the final weight uses the exact likelihood). ``diagonal``:
    the rows of ``H`` have disjoint supports and ``R`` is diagonal, so every
    observation-space covariance below is diagonal and decomposes per observation.
    """

    def __init__(self, obs: Any, state_shape: Sequence[int], dtype, device) -> None:
        self.obs, self.state_shape = obs, tuple(state_shape)
        self.lin, self.rows, self.funcs = _decompose(obs.operator)
        H = self.lin.matrix(self.state_shape, dtype=dtype, device=device)
        if self.rows is not None:
            H = H[self.rows.to(H.device)]
        self.H, self.H2, self.m = H, H * H, H.shape[0]
        disjoint = bool(((H != 0).sum(0) <= 1).all())
        noise = obs.noise
        if isinstance(noise, GaussianNoise) and noise.R is not None:
            self.r_var, self.R = None, noise.covariance(self.m).to(device=device, dtype=dtype)
        elif isinstance(noise, GaussianNoise | StudentTNoise):
            cov = noise.covariance(self.m)
            self.r_var, self.R = torch.diagonal(cov).to(device=device, dtype=dtype), None
        else:
            raise InputError(f"guidance needs Gaussian or Student-t noise, got {noise!r}")
        self.diagonal = disjoint and self.R is None

    def _need_diagonal(self) -> None:
        raise InputError(
            "per-observation (localised) weights need a diagonal R and an operator whose "
            "rows do not overlap (identity, subset, coarsen, pointwise of those)"
        )

    # -- the operator and its pointwise derivative ---------------------------------------
    def h_and_slope(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``h(x)`` ``(N, m)`` and ``a = f'(H x)`` ``(N, m)`` (``None`` when linear)."""
        w = self.lin(x)
        if self.rows is not None:
            w = w[:, self.rows.to(w.device)]
        a = None
        for f in self.funcs:
            g = _FUNCS[f][1](w)
            a = g if a is None else a * g
            w = _FUNCS[f][0](w)
        return w, a

    def apply_h(self, z: Tensor) -> Tensor:
        """``H z`` for ``z`` ``(N, d)``."""
        return z @ self.H.T

    def flat_var(self, v: Tensor | float, n: int) -> Tensor:
        """A variance broadcastable to ``(N, *S)`` as ``(1, d)`` (shared) or ``(N, d)``."""
        v = torch.as_tensor(v, dtype=self.H.dtype, device=self.H.device)
        full = (n, *self.state_shape)
        if v.dim() == len(full) and v.shape[0] == n and n > 1:
            return v.broadcast_to(full).reshape(n, -1)
        if v.dim() == len(full):
            v = v[0]
        return v.broadcast_to(self.state_shape).reshape(1, -1)

    def cov(self, w: Tensor | None, a: Tensor | None) -> Tensor:
        """``R + diag(a) H diag(w) H^T diag(a)``: ``(B, m)`` (diagonal) or ``(B, m, m)``."""
        if self.diagonal:
            out = self.r_var.unsqueeze(0)
            if w is not None:
                p = w @ self.H2.T
                out = out + (p if a is None else a * a * p)
            return out
        out = (self.R if self.R is not None else torch.diag(self.r_var)).unsqueeze(0)
        if w is not None:
            p = (self.H * w.unsqueeze(1)) @ self.H.T
            if a is not None:
                p = a.unsqueeze(-1) * p * a.unsqueeze(-2)
            out = out + p
        return out

    def logpdf(self, r: Tensor, cov: Tensor, per_obs: bool = False) -> Tensor:
        """``log N(r; 0, cov)`` ``(N,)`` or, diagonal only, per observation ``(N, m)``."""
        if self.diagonal:
            lp = -0.5 * (r * r / cov + torch.log(cov) + _LOG_2PI)
            return lp if per_obs else lp.sum(-1)
        if per_obs:
            self._need_diagonal()
        L = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * ((z * z).sum(-1) + logdet + self.m * _LOG_2PI)

    def solve(self, cov: Tensor, r: Tensor) -> Tensor:
        """``cov^{-1} r`` row by row, ``r`` ``(N, m)``."""
        if self.diagonal:
            return r / cov
        L = torch.linalg.cholesky(cov)
        return torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)

    def sample_noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``eta ~ N(0, R)`` ``(n, m)`` (Gaussian, also for Student-t's moment match)."""
        eps = randn((n, self.m), generator, device=self.H.device, dtype=self.H.dtype)
        if self.R is None:
            return eps * self.r_var.sqrt()
        return eps @ torch.linalg.cholesky(self.R).T

    def log_likelihood(self, y: Tensor, x: Tensor, per_obs: bool = False) -> Tensor:
        """Exact ``log g(y | x)``: ``(N,)`` via the observation, or per observation."""
        if not per_obs:
            return self.obs.log_likelihood(y, x)
        if not self.diagonal:
            self._need_diagonal()
        r = y - self.h_and_slope(x)[0]
        noise = self.obs.noise
        if isinstance(noise, StudentTNoise):
            s = noise.scale.to(r.device, r.dtype).expand(self.m)
            nu = noise.df
            const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
            return const - torch.log(s) - (nu + 1) / 2 * torch.log1p((r / s) ** 2 / nu)
        return self.logpdf(r, self.r_var.unsqueeze(0), per_obs=True)
