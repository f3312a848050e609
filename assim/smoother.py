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
from assim.rng import rand, randn
from assim.smoother_ar1 import ar1_window_posterior
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
    resid_rho: float = 0.0
    _chol_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_points(self) -> int:
        return self.resid_cov.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def to(self, device: torch.device | str) -> GaussianWindowPrior:
        mats = (self.basis, self.lam, self.rho, self.resid_cov)
        return GaussianWindowPrior(*(m.to(device) for m in mats), self.resid_rho)

    def dense_cov(self, n_steps: int) -> Tensor:
        """Covariance of a whole window flattened ``(k, p)``: ``W C_a W^T + R_T (x) K``,
        ``(TP, TP)`` (``W = I_T (x) U``, ``(R_T)_kl = resid_rho^|k-l|``); dense, for
        small windows, tests and the AR(1)-residual posterior."""
        big = torch.block_diag(*[self.basis] * n_steps)
        k = torch.arange(n_steps, device=self.resid_cov.device, dtype=self.resid_cov.dtype)
        r_t = float(self.resid_rho) ** (k[:, None] - k[None, :]).abs()
        cov = torch.kron(r_t, self.resid_cov)
        if self.rank:
            cov = cov + big @ self.amp_cov(n_steps) @ big.T
        return 0.5 * (cov + cov.T)

    def spatial_cov(self) -> Tensor:
        """Marginal covariance of one step ``U diag(lam) U^T + K`` ``(P, P)``."""
        return (self.basis * self.lam) @ self.basis.T + self.resid_cov

    def lag_cov_diag(self) -> Tensor:
        """Per-point lag-1 covariance ``Cov(z_{k,p}, z_{k-1,p})`` ``(P,)``."""
        eof = (self.basis**2 * (self.lam * self.rho)).sum(1)
        return eof + self.resid_rho * torch.diagonal(self.resid_cov)

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
        if self.resid_rho:  # AR(1) in time, stationary: e_k = rho e_{k-1} + sqrt(1-rho^2) xi
            c = (1 - self.resid_rho**2) ** 0.5
            for k in range(1, n_steps):
                e[:, k] = self.resid_rho * e[:, k - 1] + c * e[:, k]
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
        smp, mean, _, _, _ = self._posterior(z, n, generator)
        return smp, mean

    def posterior_scaled(
        self,
        z: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        scale: str = "window",
        dof: float = 1.0,
        var_factor: float = 1.0,
        return_share: bool = False,
    ) -> tuple[Tensor, ...]:
        """Posterior samples ``(n, T, P)`` and mean ``(T, P)`` of a prior ``N(0, s2 Sigma)``
        whose variance scale ``s2`` is learnt from the window's own observations; the
        deviations from the mean are further multiplied by ``sqrt(var_factor)`` (a
        calibration factor fitted on held-out data, :mod:`assim.impute_prior`).

        - ``scale="fixed"``: ``s2 = 1`` (:meth:`posterior` times ``var_factor``).
        - ``scale="window"``: one scale for the window, ``s2 ~ InvGamma(dof/2, dof/2)``
          a priori (mean ~1, ``dof`` pseudo-observations). Conjugacy:
          ``s2 | y ~ InvGamma((dof + n_O)/2, (dof + q)/2)`` with the Mahalanobis norm
          ``q = y^T Sigma_OO^{-1} y`` of the ``n_O`` observed entries, and
          ``z_M | y, s2 ~ N(m, s2 Sigma_M|O)`` whose mean ``m`` does not depend on ``s2``;
          so one ``s2`` is drawn per sample and the Matheron deviation (an exact draw of
          ``N(0, Sigma_M|O)``) is multiplied by ``sqrt(var_factor s2)`` (exact draws of
          the scale mixture; Gelman et al., BDA3 §3.3).
        - ``scale="local"``: a scale per point and step for the part of the posterior
          variance that is "leave-one-out like". The local innovation scale is
          ``s2_loc_p = (dof + sum_i w_pi e_i^2) / (dof + sum_i w_pi)`` from the
          standardised leave-one-out residuals ``e_i`` of the observed entries of every
          step of the window, ``e_i = alpha_i / sqrt(Q_ii)`` with ``alpha = Sigma_OO^{-1}
          y`` (Rasmussen & Williams eq. 5.12; ``Q_ii`` approximated by the residual
          block's ``(K_OO^{-1})_ii``, which ignores the EOF part's small correction),
          weighted by the residual correlation ``w_pi = max(0, K_pi / sqrt(K_pp K_ii))``.
          It applies to the share ``kappa = v_loo / v_post`` (clamped to [0, 1]) of the
          posterior variance ``v_post`` (estimated from at least 16 Matheron draws) that
          a point would have with all its neighbours observed, ``v_loo_p = 1 /
          (K^{-1})_pp``; the rest (a gap's large-scale uncertainty) keeps the prior's
          scale, inflated (never deflated) by the window scale of ``"window"``:
          ``s2 = kappa s2_loc + (1 - kappa) max(1, (dof + q) / (dof + n_O))``. An isolated
          missing point thus gets the size of the innovations around it (heteroscedastic
          errors), the inside of a large gap the calibrated prior's spread, widened in a
          regime with larger anomalies than the fit period (``q / n_O`` is dominated by
          small scales, so it is only trusted to inflate).

        ``return_share``: also return the leave-one-out-like share ``(T, P)`` of each
        returned variance: ``kappa`` (16+ draws), ``kappa s2_loc / s2`` for "local".
        """
        if scale not in ("fixed", "window", "local"):
            raise ValueError(f"scale must be 'fixed', 'window' or 'local', got {scale!r}")
        n_draw = max(n, 16) if scale == "local" or return_share else n
        smp, mean, quad, n_obs, local = self._posterior(z, n_draw, generator, scale == "local")
        dev = (smp - mean) * float(var_factor) ** 0.5
        kappa = None
        if scale == "local" or return_share:
            v_post = (smp - mean).var(0).clamp_min(1e-300)
            kappa = (self.loo_var() / v_post).clamp(0.0, 1.0)
            dev = dev[:n]
        if scale == "window":
            shape, rate = 0.5 * (dof + n_obs), 0.5 * (dof + float(quad))
            s2 = rate / _gamma(shape, n, generator).to(smp)
            dev = dev * s2.sqrt()[:, None, None]
        elif scale == "local":
            num, den = local
            far = max(1.0, (dof + float(quad)) / (dof + n_obs))
            loc = kappa * (dof + num) / (dof + den)
            s2 = loc + (1 - kappa) * far
            dev, kappa = dev * s2.sqrt(), loc / s2
        return (mean + dev, mean, kappa) if return_share else (mean + dev, mean)

    def resid_precision(self) -> Tensor:
        """``K^{-1}`` ``(P, P)`` of the residual (cached; the leave-one-out variances and
        the AR(1) path of :mod:`assim.smoother_ar1` share it)."""
        if "kinv" not in self._chol_cache:
            full = torch.arange(self.n_points, device=self.resid_cov.device)
            self._chol_cache["kinv"] = torch.cholesky_inverse(self._chol(full))
        return self._chol_cache["kinv"]

    def loo_var(self) -> Tensor:
        """Residual variance of each point given all others, ``1 / (K^{-1})_pp`` ``(P,)``
        (cached)."""
        if "loo_var" not in self._chol_cache:
            self._chol_cache["loo_var"] = 1.0 / torch.diagonal(self.resid_precision())
        return self._chol_cache["loo_var"]

    def mahalanobis(self, z: Tensor) -> tuple[float, int]:
        """``(q, n_O)``: ``q = y^T Sigma_OO^{-1} y`` over the observed entries of ``z``."""
        _, _, quad, n_obs, _ = self._posterior(z, 0, None)
        return float(quad), n_obs

    def _posterior(
        self, z: Tensor, n: int, generator: torch.Generator | None, local: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, int, tuple[Tensor, Tensor] | None]:
        """Matheron samples, mean path, ``q``, ``n_O`` and (``local``) the weighted sums
        ``(sum_i w_pi e_i^2, sum_i w_pi)`` ``(P,)`` of :meth:`posterior_scaled`."""
        z = z.to(self.resid_cov)
        n_steps, p = z.shape
        if p != self.n_points:
            raise ValueError(f"window has {p} points, prior has {self.n_points}")
        r = self.rank
        prior = self.sample(n, n_steps, generator)
        zs = torch.cat([prior, prior.new_zeros(1, n_steps, p)], 0)  # last: mean path
        obs = torch.isfinite(z)
        if self.resid_rho:  # block-tridiagonal precision path (exact)
            return ar1_window_posterior(self, z, zs, obs, local)
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
        quad = torch.zeros((), dtype=z.dtype, device=z.device)
        num = torch.zeros(p, dtype=z.dtype, device=z.device)
        den = torch.zeros(p, dtype=z.dtype, device=z.device)
        sd = torch.diagonal(self.resid_cov).sqrt()
        if r:
            ca = self.amp_cov(n_steps)
            s = torch.linalg.inv(ca) + torch.block_diag(*g)
            c = torch.linalg.solve(s, b.reshape(n + 1, -1).T).T.reshape(n + 1, n_steps, r)
            wt_alpha = torch.zeros_like(b)
        for k, io in enumerate(idx):
            if io.numel() == 0:
                continue
            alpha = binv_d[k] - (c[:, k] @ binv_u[k].T if r else 0.0)
            quad = quad + alpha[n] @ z[k, io]  # the mean path: alpha = Sigma_OO^{-1} y
            out[:, k] += alpha @ self.resid_cov[io]
            if local:
                qd = torch.diagonal(torch.cholesky_inverse(self._chol(io)))
                w = (self.resid_cov[io] / (sd[io, None] * sd[None, :])).clamp_min(0)
                num += (alpha[n] ** 2 / qd) @ w
                den += w.sum(0)
            if r:
                wt_alpha[:, k] = alpha @ self.basis[io]
        if r:
            amp = (wt_alpha.reshape(n + 1, -1) @ ca).reshape(n + 1, n_steps, r)
            out += amp @ self.basis.T
        return out[:n], out[n], quad, int(obs.sum()), ((num, den) if local else None)


def _gamma(shape: float, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``Gamma(shape, 1)`` (float64) from ``generator``: Marsaglia & Tsang
    (2000) squeeze/rejection for ``shape >= 1``, boosted by ``U^(1/shape)`` below 1."""
    a = shape if shape >= 1 else shape + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    dev = generator.device if generator is not None else None
    out = torch.empty(0, dtype=torch.float64, device=dev)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 8
        x = randn((m,), generator, dtype=torch.float64)
        u = rand((m,), generator, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.clamp_min(1e-300).log())
        out = torch.cat([out, (d * v)[ok]])
    out = out[:n]
    if shape < 1:
        out = out * rand((n,), generator, dtype=torch.float64) ** (1.0 / shape)
    return out


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
