"""Posterior samples of a window of states given sparse observations across it.

A window is ``(T, P)``: ``T`` physical steps of a field flattened over its ``P`` valid
grid points; NaN marks an unobserved entry.

:class:`GaussianWindowPrior` is a space-time Gaussian prior

    z_k = U a_k + e_k,   a_{k,i} ~ AR(1)(lambda_i, rho_i),   e_k ~ N(0, K) i.i.d.,

(leading EOFs ``U`` ``(P, r)`` with temporally correlated amplitudes plus a spatially
correlated residual, e.g. Matérn). Conditioning on exact observations is done by
Matheron's rule (pathwise conditioning; Wilson et al. 2020, "Efficiently sampling
functions from Gaussian process posteriors"):

    z_post = z~ + Sigma_{:,O} Sigma_OO^{-1} (y - z~_O),   z~ ~ prior,

with ``Sigma_OO = B + W C_a W^T`` (``B`` block-diagonal residual covariance over the
observed points of each step, ``W = blockdiag(U_{O_k})``) inverted by the Woodbury
identity, so the cost is one Cholesky per distinct observation pattern plus one of
size ``rT``. The samples are exact draws from ``p(z | y)`` (up to round-off); the
zero-prior-sample path gives the exact posterior mean.

The same prior is a diffusion oracle: its marginal over one step is
``N(0, U diag(lambda) U^T + K)``, whose Tweedie denoiser is closed-form
(:meth:`GaussianWindowPrior.spatial_cov`). Learned diffusion priors are guided over
windows by :func:`twisted_inpaint` (twisted SMC: exact importance weights, so it
converges to ``p(x_M | y)`` as the number of particles grows; Wu et al. 2023; defined in
:mod:`assim.twisted` with :class:`DiffusionChain`, re-exported here) or
:func:`guided_inpaint` (replacement; biased, kept for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from assim.errors import InputError
from assim.rng import randn
from assim.twisted import DiffusionChain, TwistedResult, twisted_inpaint, twisted_smc

__all__ = [
    "DiffusionChain",
    "GaussianWindowPrior",
    "TwistedResult",
    "gaussian_conditional",
    "guided_inpaint",
    "twisted_inpaint",
    "twisted_smc",
]


@dataclass
class GaussianWindowPrior:
    """Space-time Gaussian prior of standardised anomalies (see module docstring).

    ``basis`` ``(P, r)`` orthonormal columns (``r`` may be 0), ``lam`` and ``rho``
    ``(r,)``, ``resid_cov`` ``(P, P)`` positive definite. All float64.
    """

    basis: Tensor
    lam: Tensor
    rho: Tensor
    resid_cov: Tensor
    _chol_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_points(self) -> int:
        return self.resid_cov.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def to(self, device: torch.device | str) -> GaussianWindowPrior:
        return GaussianWindowPrior(
            self.basis.to(device),
            self.lam.to(device),
            self.rho.to(device),
            self.resid_cov.to(device),
        )

    def dense_cov(self, n_steps: int) -> Tensor:
        """Covariance of a whole window flattened ``(k, p)``: ``W C_a W^T + I_T (x) K``,
        ``(TP, TP)`` (``W = I_T (x) U``); dense, for small windows and tests."""
        big = torch.block_diag(*[self.basis] * n_steps)
        cov = torch.block_diag(*[self.resid_cov] * n_steps)
        if self.rank:
            cov = cov + big @ self.amp_cov(n_steps) @ big.T
        return 0.5 * (cov + cov.T)

    def spatial_cov(self) -> Tensor:
        """Marginal covariance of one step ``U diag(lam) U^T + K`` ``(P, P)``."""
        return (self.basis * self.lam) @ self.basis.T + self.resid_cov

    def lag_cov_diag(self) -> Tensor:
        """Per-point lag-1 covariance ``Cov(z_{k,p}, z_{k-1,p})`` ``(P,)`` (residual is
        temporally independent)."""
        return (self.basis**2 * (self.lam * self.rho)).sum(1)

    def amp_cov(self, n_steps: int) -> Tensor:
        """Covariance of the stacked amplitudes ``a`` ordered ``(k, i)``, ``(rT, rT)``:
        ``Cov(a_{k,i}, a_{l,j}) = delta_ij lambda_i rho_i^|k-l|``."""
        k = torch.arange(n_steps, device=self.lam.device, dtype=self.lam.dtype)
        lag = (k[:, None] - k[None, :]).abs()  # (T, T)
        c = self.lam * self.rho[None, None, :] ** lag[..., None]  # (T, T, r)
        eye = torch.eye(self.rank, dtype=self.lam.dtype, device=self.lam.device)
        return (
            (c[:, :, :, None] * eye)
            .permute(0, 2, 1, 3)
            .reshape(n_steps * self.rank, n_steps * self.rank)
        )

    def _chol(self, idx: Tensor) -> Tensor:
        """Cached Cholesky factor of ``K[idx, idx]``."""
        key = (idx.numel(), hash(idx.cpu().numpy().tobytes()))
        if key not in self._chol_cache:
            if len(self._chol_cache) > 64:
                self._chol_cache.clear()
            self._chol_cache[key] = torch.linalg.cholesky(self.resid_cov[idx][:, idx])
        return self._chol_cache[key]

    def sample(self, n: int, n_steps: int, generator: torch.Generator | None = None) -> Tensor:
        """Prior draws ``(n, T, P)``: AR(1) amplitudes plus residual ``L_K eps``."""
        dev, dt = self.resid_cov.device, self.resid_cov.dtype
        r, p = self.rank, self.n_points
        eps = randn((n, n_steps, r + p), generator, device=dev, dtype=dt)
        a = torch.empty(n, n_steps, r, dtype=dt, device=dev)
        if r:
            a[:, 0] = self.lam.sqrt() * eps[:, 0, :r]
            innov = (self.lam * (1 - self.rho**2)).sqrt()
            for k in range(1, n_steps):
                a[:, k] = self.rho * a[:, k - 1] + innov * eps[:, k, :r]
        full = torch.arange(p, device=dev)
        e = eps[..., r:] @ self._chol(full).T
        return a @ self.basis.T + e

    def posterior(
        self,
        z: Tensor,
        n: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Exact posterior samples ``(n, T, P)`` and mean ``(T, P)`` given a window ``z``
        ``(T, P)`` whose NaN entries are unobserved (Matheron's rule + Woodbury).

        Observed entries of the returned samples equal ``z`` up to round-off; callers
        that need them bit for bit copy them back (:func:`assim.impute.impute_array`).
        """
        z = z.to(self.resid_cov)
        n_steps, p = z.shape
        if p != self.n_points:
            raise ValueError(f"window has {p} points, prior has {self.n_points}")
        r = self.rank
        prior = self.sample(n, n_steps, generator)
        zs = torch.cat([prior, torch.zeros_like(prior[:1])], 0)  # last: mean path
        obs = torch.isfinite(z)
        idx = [obs[k].nonzero().squeeze(1) for k in range(n_steps)]
        # B^{-1} d_k and B^{-1} U_{O_k}
        binv_d, binv_u = [], []
        g = torch.zeros(n_steps, r, r, dtype=z.dtype, device=z.device)
        b = torch.zeros(n + 1, n_steps, r, dtype=z.dtype, device=z.device)
        for k, io in enumerate(idx):
            if io.numel() == 0:
                binv_d.append(None)
                binv_u.append(None)
                continue
            chol = self._chol(io)
            d = z[k, io] - zs[:, k, io]  # (n+1, n_k)
            bd = torch.cholesky_solve(d.T, chol).T
            binv_d.append(bd)
            if r:
                uo = self.basis[io]
                bu = torch.cholesky_solve(uo, chol)
                binv_u.append(bu)
                g[k] = uo.T @ bu
                b[:, k] = bd @ uo
        out = zs.clone()
        if r:
            ca = self.amp_cov(n_steps)
            s = torch.linalg.inv(ca) + torch.block_diag(*g)
            c = torch.linalg.solve(s, b.reshape(n + 1, -1).T).T.reshape(n + 1, n_steps, r)
            wt_alpha = torch.zeros_like(b)
        for k, io in enumerate(idx):
            if io.numel() == 0:
                continue
            alpha = binv_d[k] - (c[:, k] @ binv_u[k].T if r else 0.0)
            out[:, k] += alpha @ self.resid_cov[io]
            if r:
                wt_alpha[:, k] = alpha @ self.basis[io]
        if r:
            amp = (wt_alpha.reshape(n + 1, -1) @ ca).reshape(n + 1, n_steps, r)
            out += amp @ self.basis.T
        return out[:n], out[n]


def gaussian_conditional(mu: Tensor, cov: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact Gaussian conditional of the NaN entries of ``x`` ``(D,)`` given the others
    under ``N(mu, cov)``: returns the full mean ``(D,)`` and the covariance ``(D, D)``
    (zero rows/columns at observed entries). The closed form used by the tests."""
    obs = torch.isfinite(x)
    io, im = obs.nonzero().squeeze(1), (~obs).nonzero().squeeze(1)
    c_oo, c_mo = cov[io][:, io], cov[im][:, io]
    gain = torch.linalg.solve(c_oo, c_mo.T).T
    mean = x.clone().to(mu)
    mean[im] = mu[im] + gain @ (x[io] - mu[io])
    out = torch.zeros_like(cov)
    out[im[:, None], im[None, :]] = cov[im][:, im] - gain @ c_mo.T
    return mean, out


# ------------------------------------------------------------------ learned diffusion prior
@torch.no_grad()
def guided_inpaint(
    sampler,
    x: Tensor,
    n: int,
    steps: int = 100,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
) -> Tensor:
    """Samples ``(n, *S)`` of the NaN entries of ``x`` ``S`` under a diffusion prior by
    replacement inpainting (Song et al. 2021, app. I; Lugmayr et al. 2022 without
    resampling jumps): the observed entries follow one forward-noised path
    ``y_{t_J}, ..., y_{t_0}`` (drawn from the forward Markov chain starting at ``y``),
    the missing ones are drawn from the sampler's Gaussian kernel ``p(x_s | x_t)``; the
    last step returns the Tweedie mean. Observed entries of the result equal ``x``.

    This is an *approximation* of ``p(x_M | x_O)`` (exact when the missing entries are
    independent of the observed ones). For the default Gaussian prior use
    :func:`impute_array`, which samples the posterior exactly. An SMCDiff-style
    reweighting by the DDPM kernel's density of the observed part was tried and made
    things worse on a Gaussian oracle (the DDPM kernel's variance ignores the
    uncertainty of ``x_0``), so it is not offered.
    """
    obs = torch.isfinite(x)
    if not bool(obs.any()):
        raise InputError("nothing is observed: every value is NaN")
    ts = sampler.timesteps(steps, device=x.device)
    sched = sampler.schedule
    y = x[obs]

    def noise(shape):
        return randn(shape, generator, device=x.device, dtype=x.dtype)

    # forward path of the observations: y_{t_0} from y, then up the forward chain
    path = [None] * len(ts)
    a0, s0 = (v.to(x.dtype) for v in sched(ts[-1]))
    path[-1] = a0 * y + s0 * noise((n, y.numel()))
    for j in range(len(ts) - 2, -1, -1):
        (a_s, s_s), (a_t, s_t) = sched(ts[j + 1]), sched(ts[j])
        ratio = a_t / a_s
        sd = (s_t**2 - ratio**2 * s_s**2).clamp_min(0).sqrt()
        path[j] = ratio.to(x.dtype) * path[j + 1] + sd.to(x.dtype) * noise(path[j + 1].shape)
    xt = sampler.init((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    xt[:, obs] = path[0]
    for j in range(steps - 1):
        xt = sampler.transition(xt, ts[j], ts[j + 1], cond).sample(generator)
        xt[:, obs] = path[j + 1]
    out = sampler.denoiser(xt, ts[steps - 1], cond)
    out[:, obs] = x[obs]
    return out
