"""Exact window posterior of the space-time Gaussian prior with an AR(1) residual in time.

The prior (:class:`~assim.smoother.GaussianWindowPrior` with ``resid_rho = rho > 0``)

    z_k = U a_k + e_k,   Cov(e_k, e_l) = rho^|k-l| K,

has no block-diagonal observation covariance, so the Woodbury path of the white residual
does not apply; forming the dense ``(T n_O)^2`` covariance costs ``O((T n_O)^3)``. Here the
residual's *precision* is used instead: ``Lambda = R^{-1} (x) K^{-1}`` with ``R^{-1}`` the
tridiagonal inverse of the AR(1) correlation matrix. Given the observations ``y`` at the
entries ``O`` of the window, the unknowns are the amplitudes ``a`` (``rT``) and the
residual at the missing entries ``e_M``, because ``e_O = y - W a`` (``W`` the EOF rows of the
observed entries, step by step). Their joint posterior is Gaussian with precision

    A_MM = Lambda_MM,   A_Ma = -Lambda_MO W,   A_aa = C_a^{-1} + W^T Lambda_OO W,

and information vector ``h_M = -Lambda_MO y``, ``h_a = W^T Lambda_OO y`` (complete the square
in ``-log p(a) - log p(e_M, e_O = y - W a)``). ``A_MM`` is block tridiagonal in time, so it is
factorised step by step (block Cholesky, cost ``sum_k n_M,k^3``), and the amplitudes are
solved through the ``rT x rT`` Schur complement. The result is the exact conditional mean;
samples follow by Matheron's rule as in the white case (same prior draws).

The score statistics of :meth:`~assim.smoother.GaussianWindowPrior.posterior_scaled` need
``alpha = Sigma_OO^{-1} y``: since ``E[e | y] = Sigma_e[:, O] alpha``, it is
``alpha = (Lambda E[e | y])_O`` (and ``(Lambda E[e | y])_M = 0``). The leave-one-out
precisions ``(Sigma_OO^{-1})_ii`` of the "local" spread model are estimated from the
Matheron draws, whose ``alpha`` deviations are exact draws of ``N(0, Sigma_OO^{-1})``
(unbiased for ``1 / Q_ii`` after the factor ``(n - 2) / n``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from assim.smoother import GaussianWindowPrior

__all__ = ["ar1_precision", "ar1_window_posterior"]


def ar1_precision(n_steps: int, rho: float, dtype=torch.float64, device=None) -> Tensor:
    """Inverse ``(T, T)`` of the stationary AR(1) correlation matrix ``rho^|k-l|``:
    tridiagonal, ``(1 + rho^2) / (1 - rho^2)`` inside, ``1 / (1 - rho^2)`` at both ends,
    ``-rho / (1 - rho^2)`` off the diagonal (``[[1]]`` for one step)."""
    if n_steps == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    c = 1.0 / (1.0 - rho * rho)
    d = torch.full((n_steps,), (1.0 + rho * rho) * c, dtype=dtype, device=device)
    d[0] = d[-1] = c
    off = torch.full((n_steps - 1,), -rho * c, dtype=dtype, device=device)
    return torch.diag(d) + torch.diag(off, 1) + torch.diag(off, -1)


class _BlockTridiagonal:
    """Block Cholesky of the symmetric block-tridiagonal ``A_MM`` (blocks ``(M_k, M_l)``,
    ``|k - l| <= 1``) and solves with it."""

    def __init__(self, n_blocks: int, diag, lower):
        # diag(k): (m_k, m_k) block A_kk; lower(k): (m_k, m_{k-1}) block A_{k,k-1}; built
        # one at a time (only the factors are kept)
        self.chol: list[Tensor] = []
        self.f: list[Tensor | None] = [None]
        for k in range(n_blocks):
            dk = diag(k)
            if k:
                fk = torch.linalg.solve_triangular(
                    self.chol[k - 1], lower(k).T, upper=False
                ).T  # A_{k,k-1} L_{k-1}^{-T}
                self.f.append(fk)
                dk = dk - fk @ fk.T
            self.chol.append(torch.linalg.cholesky(dk))

    def solve(self, rhs: list[Tensor]) -> list[Tensor]:
        """``A_MM^{-1} b`` for per-step blocks ``rhs[k]`` ``(m_k, c)``."""
        y: list[Tensor] = []
        for k, bk in enumerate(rhs):
            if k:
                bk = bk - self.f[k] @ y[k - 1]
            y.append(torch.linalg.solve_triangular(self.chol[k], bk, upper=False))
        x: list[Tensor] = [y[-1]] * len(y)
        for k in range(len(y) - 1, -1, -1):
            yk = y[k] if k == len(y) - 1 else y[k] - self.f[k + 1].T @ x[k + 1]
            x[k] = torch.linalg.solve_triangular(self.chol[k].T, yk, upper=True)
        return x


def ar1_window_posterior(
    prior: GaussianWindowPrior, z: Tensor, zs: Tensor, obs: Tensor, local: bool
) -> tuple[Tensor, Tensor, Tensor, int, tuple[Tensor, Tensor] | None]:
    """The outputs of :meth:`~assim.smoother.GaussianWindowPrior._posterior` for
    ``prior.resid_rho > 0`` (module docstring): Matheron samples ``(n, T, P)`` from the
    prior draws ``zs[:n]`` (``zs[n]`` is the zero path), the mean ``(T, P)``,
    ``q = y^T Sigma_OO^{-1} y``, ``n_O`` and (``local``) the weighted leave-one-out sums."""
    n_steps, p = z.shape
    n = zs.shape[0] - 1
    r = prior.rank
    kinv, u = prior.resid_precision(), prior.basis
    rinv = ar1_precision(n_steps, float(prior.resid_rho), z.dtype, z.device)
    io = [obs[k].nonzero().squeeze(1) for k in range(n_steps)]
    im = [(~obs[k]).nonzero().squeeze(1) for k in range(n_steps)]
    d = z.nan_to_num(0.0)[None] - zs  # (n+1, T, P): y - z~ (used on O only)
    # G_l = K^{-1}[:, O_l] [d_l | U_{O_l}]  (P, n+1+r)
    g = [kinv[:, io[k]] @ torch.cat([d[:, k, io[k]].T, u[io[k]]], 1) for k in range(n_steps)]
    near = [[j for j in (k - 1, k, k + 1) if 0 <= j < n_steps] for k in range(n_steps)]

    def mix(k: int, rows: Tensor, cols: slice) -> Tensor:  # sum_l Rinv_kl G_l[rows, cols]
        return sum(rinv[k, j] * g[j][rows, cols] for j in near[k])

    # h_M = -Lambda_MO d ; A_Ma[M_k, a_l] = -Rinv_kl K^{-1}[M_k, O_l] U_{O_l}
    h_m = [-mix(k, im[k], slice(0, n + 1)) for k in range(n_steps)]
    a_ma = []
    for k in range(n_steps):
        blk = torch.zeros(im[k].numel(), n_steps * r, dtype=z.dtype, device=z.device)
        for j in near[k]:
            blk[:, j * r : (j + 1) * r] = -rinv[k, j] * g[j][im[k], n + 1 :]
        a_ma.append(blk)
    tri = _BlockTridiagonal(
        n_steps,
        lambda k: rinv[k, k] * kinv[im[k]][:, im[k]],
        lambda k: rinv[k, k - 1] * kinv[im[k]][:, im[k - 1]],
    )
    sol = tri.solve([torch.cat([h_m[k], a_ma[k]], 1) for k in range(n_steps)])
    if r:
        # A_aa = C_a^{-1} + W^T Lambda_OO W ; h_a = W^T Lambda_OO d
        a_aa = torch.linalg.inv(prior.amp_cov(n_steps))
        h_a = torch.zeros(n + 1, n_steps * r, dtype=z.dtype, device=z.device)
        for k in range(n_steps):
            uo = u[io[k]]
            h_a[:, k * r : (k + 1) * r] = (uo.T @ mix(k, io[k], slice(0, n + 1))).T
            for j in near[k]:
                a_aa[k * r : (k + 1) * r, j * r : (j + 1) * r] += rinv[k, j] * (
                    uo.T @ g[j][io[k], n + 1 :]
                )
        schur = a_aa - sum(a_ma[k].T @ sol[k][:, n + 1 :] for k in range(n_steps))
        rhs = h_a.T - sum(a_ma[k].T @ sol[k][:, : n + 1] for k in range(n_steps))
        amp = torch.linalg.solve(0.5 * (schur + schur.T), rhs).T  # (n+1, rT)
        amp = amp.reshape(n + 1, n_steps, r)
    # posterior mean of the residual e for each right-hand side, then of z
    e = torch.empty_like(d)
    for k in range(n_steps):
        e_m = sol[k][:, : n + 1] - (sol[k][:, n + 1 :] @ amp.reshape(n + 1, -1).T if r else 0.0)
        e[:, k, im[k]] = e_m.T
        fit_o = amp[:, k] @ u[io[k]].T if r else 0.0
        e[:, k, io[k]] = d[:, k, io[k]] - fit_o
    out = zs + e + (amp @ u.T if r else 0.0)
    # alpha = (Lambda E[e | d])_O per right-hand side (the mean path only unless local);
    # q from the mean path
    rows = e if local else e[n:]
    lam_e = torch.einsum("kl,slp->skp", rinv, rows @ kinv)
    alpha = [lam_e[:, k, io[k]] for k in range(n_steps)]  # last row: the mean path
    quad = sum(alpha[k][-1] @ z[k, io[k]] for k in range(n_steps))
    stats = None
    if local:
        sd = torch.diagonal(prior.resid_cov).sqrt()
        w = (prior.resid_cov / (sd[:, None] * sd[None, :])).clamp_min(0)
        e2 = torch.zeros(n_steps, p, dtype=z.dtype, device=z.device)
        for k in range(n_steps):
            # the deviations alpha^(s) - alpha are draws of N(0, Sigma_OO^{-1})
            q_hat = ((alpha[k][:n] - alpha[k][n]) ** 2).mean(0).clamp_min(1e-300)
            e2[k, io[k]] = alpha[k][n] ** 2 * (n - 2) / (n * q_hat)
        stats = (e2.sum(0) @ w, obs.to(z.dtype).sum(0) @ w)
    return out[:n], out[n], quad, int(obs.sum()), stats
