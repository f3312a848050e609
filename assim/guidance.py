"""Likelihood guidance for a diffusion chain (DESIGN.md §2 "Guidance").

One physical step of a diffusion world is a chain ``x_{t_J} -> ... -> x_{t_0}``
(:class:`~models.worlds.base.TransitionChain`). Guidance targets, at chain index ``j``,
the diffusion marginal times a *twist* ``p~_j(y | x_{t_j})`` and proposes each step from
the sampler's Gaussian kernel ``N(m, diag v)`` combined with that twist. The importance
weight of a step ``t -> s`` is

    p(x_s | x_t) p~_s(y | x_s) / (q(x_s | x_t, y) p~_t(y | x_t))

so the weights are exact for *any* proposal ``q`` (twisted diffusion sampling, Wu et
al. 2023; SMC-guided diffusion / FK steering, Singhal et al. 2025). Pieces:

* :func:`gaussian_twist` -- ``p~_j(y | x) = N(y; h(D_j(x)), R + J diag(u_j) J^T)`` with
  ``D_j`` the chain's denoiser, ``u_j`` its ``denoise_var`` and ``J = h'`` at ``D_j(x)``.
* :func:`twisted_gaussian_proposal` -- the closed-form product of the kernel with a
  twist that is *linear* in ``x_s``: ``y ~ N(h(x_lin) + G (x_s - m), S)``, ``G = diag(a) H
  diag(kappa)``. Sampled exactly with Matheron's rule (perturbed observations), and
  ``p(x_s | x_t) N(y; ., S) / q(x_s) = N(r; 0, G V G^T + S)`` -- so no ``d x d`` matrix
  is ever formed: everything happens in observation space (diagonal fast path when the
  rows of ``H`` have disjoint supports and ``R`` is diagonal: identity, subsets,
  coarsening).
* :func:`tweedie_slope` -- ``kappa_s ~ dD_s/dx_s = u_s / (nu_s^2 - nu_f^2)`` by Tweedie's
  second-order identity (Efron 2011): chains are variance-exploding in state space,
  ``x_s = x_f + (nu_s^2 - nu_f^2)^{1/2} eps`` with ``x_f`` the final state. The proposal
  linearises the twist of the *next* index, ``D_s(x_s) ~ D_t(x_t) + kappa_s (x_s - m)``,
  with the twist variance ``u_s`` on the ``R`` side. Why this choice: for a Gaussian
  prior and an exact kernel ``D_s`` is linear with slope ``kappa_s`` and
  ``E[D_s(x_s) | x_t] = D_t(x_t)``, so the proposal is the locally optimal one and the
  weights are constant. Cheaper alternatives put the mean at ``x_s`` itself (slope 1)
  with variance ``u_s`` -- overconfident at high noise, where ``x_s`` is far noisier than
  ``u_s`` says -- or need a Jacobian of the denoiser. Whatever the choice, the weights
  stay exact: they use the twist with the true ``D_s(x_s)``.
* :func:`dps_shift` -- the DPS gradient shift (Chung et al. 2023) of a kernel mean,
  ``m + zeta v grad_{x_t} log p~_t(y | x_t)`` (autograd through the denoiser).
* :func:`inpaint` -- replace observed entries by noised observations (RePaint-style
  inpainting, Lugmayr et al. 2022), for masked observations / imputation.
* :class:`Guide` strings these together along one chain (used by the diffusion particle
  filter, :mod:`assim.filters.dpf`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.obs_space import ObsSpace
from assim.rng import randn
from models.diffusion.kernel import GaussianKernel

__all__ = [
    "TWISTS",
    "Guide",
    "Increment",
    "ObsSpace",
    "Proposal",
    "dps_shift",
    "gaussian_twist",
    "inpaint",
    "twist_gradient",
    "tweedie_slope",
    "twisted_gaussian_proposal",
]


def gaussian_twist(
    space: ObsSpace, y: Tensor, x_hat: Tensor, var: Tensor | float, per_obs: bool = False
) -> Tensor:
    """``log N(y; h(x_hat), R + J diag(var) J^T)``, ``J = h'(x_hat)`` (nonlinear ``h``
    linearised at the denoised state). ``x_hat`` ``(N, *S)``; ``(N,)`` or ``(N, m)``."""
    hx, a = space.h_and_slope(x_hat)
    cov = space.cov(space.flat_var(var, x_hat.shape[0]), a)
    return space.logpdf(y - hx, cov, per_obs)


def tweedie_slope(chain: Any, j: int, var: Tensor | float) -> Tensor | None:
    """Diagonal slope ``kappa_j ~ dE[x_f | x_{t_j}] / dx_{t_j}``, clamped to ``[0, 1]``.

    ``chain.denoise_slope(j)`` when the chain provides it; else Tweedie's value
    ``u_j / (nu_j^2 - nu_f^2)`` for the bridge ``x_{t_j} = x_f + (nu_j^2 - nu_f^2)^{1/2}
    eps`` (``u_j = var`` the twist variance, ``nu_j^2 = chain.noise_var(j)`` the chain's
    state-space noise variance, ``x_f`` the final state); ``None`` (slope 1, i.e.
    ``D(x_s) ~ D(x_t) + (x_s - m)``) when the chain exposes neither."""
    slope = getattr(chain, "denoise_slope", None)
    if slope is not None:
        return torch.as_tensor(slope(j)).clamp(0.0, 1.0)
    noise_var = getattr(chain, "noise_var", None)
    if noise_var is None:
        return None
    nu2 = torch.as_tensor(noise_var(j))
    nu2_f = torch.as_tensor(noise_var(len(chain.times) - 1)).to(nu2)
    u = torch.as_tensor(var).to(nu2)
    return (u / (nu2 - nu2_f).clamp_min(1e-30)).clamp(0.0, 1.0)


@dataclass
class Proposal:
    """One draw ``x`` ``(N, *S)`` of a twisted Gaussian proposal.

    ``log_norm = log[p(x | x_t) p_lin(y | x) / q(x)] = log N(r; 0, C)`` and
    ``log_twist_lin = log p_lin(y | x)`` (the linear twist the proposal used); both
    ``(N,)`` or ``(N, m)`` per observation."""

    x: Tensor
    log_norm: Tensor
    log_twist_lin: Tensor


def twisted_gaussian_proposal(
    kernel: GaussianKernel,
    space: ObsSpace,
    y: Tensor,
    x_lin: Tensor,
    slope: Tensor | None = None,
    twist_var: Tensor | float | None = None,
    generator: torch.Generator | None = None,
    per_obs: bool = False,
) -> Proposal:
    """Sample ``q(x_s) ∝ N(x_s; m, diag v) N(y; h(x_lin) + G (x_s - m), S)``.

    ``G = diag(a) H diag(kappa)`` with ``a = f'(H x_lin)`` and ``kappa = slope`` (1 when
    ``None``); ``S = R + diag(a) H diag(u) H^T diag(a)`` with ``u = twist_var`` (0 when
    ``None``: the final step, where the twist is the likelihood itself and ``x_lin = m``).
    Matheron's rule: ``x = m + v^{1/2} eps + v G^T C^{-1} (r - G v^{1/2} eps - eta)`` with
    ``eta ~ N(0, S)``, ``r = y - h(x_lin)`` and ``C = G V G^T + S`` -- an exact draw of
    the Gaussian posterior. Cost ``O(N m d)`` (diagonal case ``O(N d)``), no ``d x d``.
    """
    m, n = kernel.mean, kernel.mean.shape[0]
    mf = m.reshape(n, -1)
    v = space.flat_var(kernel.var, n)
    k = None if slope is None else space.flat_var(slope, n)
    u = None if twist_var is None else space.flat_var(twist_var, n)
    hx, a = space.h_and_slope(x_lin)
    r = y - hx

    def g_apply(z: Tensor) -> Tensor:
        gz = space.apply_h(z if k is None else k * z)
        return gz if a is None else a * gz

    kv = v if k is None else k * k * v
    c_mat = space.cov(kv if u is None else kv + u, a)
    s_mat = space.cov(u, a)
    dev = v.sqrt() * randn(mf.shape, generator, device=m.device, dtype=m.dtype)
    eta = space.sample_noise(n, generator)
    if u is not None:  # the twist's own spread: diag(a) H u^{1/2} eps (not scaled by kappa)
        hu = space.apply_h(u.sqrt() * randn(mf.shape, generator, device=m.device, dtype=m.dtype))
        eta = eta + (hu if a is None else a * hu)
    innov = space.solve(c_mat, r - g_apply(dev) - eta)
    back = innov if a is None else a * innov
    gt = back @ space.H
    if k is not None:
        gt = k * gt
    x = mf + dev + v * gt
    log_norm = space.logpdf(r, c_mat, per_obs)
    log_lin = space.logpdf(r - g_apply(x - mf), s_mat, per_obs)
    return Proposal(x.reshape(m.shape), log_norm, log_lin)


def twist_gradient(x_t: Tensor, log_twist: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(log_twist(x_t), grad_{x_t} log_twist)`` by autograd (particles independent)."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        val = log_twist(x)
        (grad,) = torch.autograd.grad(val.sum(), x)
    return val.detach(), grad


def dps_shift(kernel: GaussianKernel, grad: Tensor, scale: float = 1.0) -> GaussianKernel:
    """DPS proposal ``N(m + zeta v grad, v)``: the kernel mean moved along the gradient of
    the log-twist, scaled by the kernel variance (a Langevin-type step, Chung et al. 2023).
    ``scale = 0`` returns the kernel unchanged."""
    if scale == 0:
        return kernel
    return GaussianKernel(kernel.mean + scale * kernel.var * grad, kernel.var)


def inpaint(
    x_s: Tensor,
    values: Tensor,
    mask: Tensor,
    alpha: Tensor | float,
    sigma: Tensor | float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace the observed entries of ``x_s`` ``(N, *S)`` by the observations noised to
    level ``s``: ``x_s[mask] = alpha_s values[mask] + sigma_s eps`` (``values`` ``S``,
    ``mask`` boolean ``S``). Unobserved entries are untouched; an empty mask is a no-op
    that draws no random numbers."""
    mask = torch.as_tensor(mask, dtype=torch.bool, device=x_s.device)
    if mask.shape != x_s.shape[1:]:
        raise InputError(f"inpaint: mask has shape {tuple(mask.shape)}, state {x_s.shape[1:]}")
    if not bool(mask.any()):
        return x_s
    obs = torch.as_tensor(values, dtype=x_s.dtype, device=x_s.device)[mask]
    eps = randn((x_s.shape[0], obs.numel()), generator, device=x_s.device, dtype=x_s.dtype)
    out = x_s.clone()
    out[:, mask] = (
        torch.as_tensor(alpha, dtype=x_s.dtype) * obs
        + torch.as_tensor(sigma, dtype=x_s.dtype) * eps
    )
    return out


TWISTS = ("gaussian", "dps", "none", "dps_only")


@dataclass
class Increment:
    """An incremental log-weight split into per-state-element terms ``state`` ``(N, d)``
    (the DPS kernel ratio) and observation terms ``obs`` (``(N,)``, or ``(N, m)`` per
    observation for localisation); ``None`` parts are zero."""

    state: Tensor | None = None
    obs: Tensor | None = None

    def total(self, n: int, like: Tensor) -> Tensor:
        out = like.new_zeros(n)
        if self.state is not None:
            out = out + self.state.sum(1)
        if self.obs is not None:
            out = out + (self.obs.sum(-1) if self.obs.dim() == 2 else self.obs)
        return out


class Guide:
    """Guided steps along one chain towards ``y``, with exact incremental log-weights.

    ``twist``: ``"gaussian"`` (closed-form twisted proposal, :func:`twisted_gaussian_proposal`,
    with the Tweedie-linearised twist), ``"dps"`` (DPS gradient shift, exact weights),
    ``"none"`` (the chain's own kernel; only the final likelihood weights: a bootstrap
    filter through the chain), ``"dps_only"`` (DPS shift and *no* weights: biased, for
    comparison only). ``space=None`` (nothing observed) or ``twist="none"``: every step is
    ``kernel(x, j).sample(generator)``, bitwise the unguided chain.

    The twist at index ``j < J`` is :func:`gaussian_twist` with ``chain.denoise(x, j)`` and
    ``chain.denoise_var(j)``; at the final index ``J`` it is the exact likelihood ``g``.
    The twist values at the current particles are cached; after resampling call
    :meth:`reindex` (ancestor indices) or :meth:`refresh` (recompute, e.g. for
    locally resampled particles whose columns come from different ancestors).
    """

    def __init__(
        self,
        chain: Any,
        space: ObsSpace | None,
        y: Tensor | None,
        twist: str = "gaussian",
        dps_scale: float = 1.0,
        per_obs: bool = False,
    ) -> None:
        if twist not in TWISTS:
            raise InputError(f"unknown twist {twist!r}; expected one of {list(TWISTS)}")
        if len(chain.times) < 2:
            raise InputError("the world's transition chain needs at least one diffusion step")
        self.chain, self.space, self.y = chain, space, y
        self.twist, self.dps_scale, self.per_obs = twist, float(dps_scale), per_obs
        self.last = len(chain.times) - 1
        self._x_hat = self._tw = self._grad = self._x = None
        self._kern: tuple[int, GaussianKernel] | None = None  # a stitched kernel (stitch())
        self.final_kernel: GaussianKernel | None = None  # kernel of the last step (step())
        self._dvar: dict[int, Any] = {}  # chain.denoise_var(j) of the current chain

    def _denoise_var(self, j: int) -> Any:
        """``chain.denoise_var(j)``, cached per chain (it is called twice per step)."""
        if j not in self._dvar:
            self._dvar[j] = self.chain.denoise_var(j)
        return self._dvar[j]

    def _set_chain(self, chain: Any) -> None:
        if chain is not self.chain:
            self.chain, self._dvar = chain, {}

    @property
    def guided(self) -> bool:
        return self.space is not None and self.twist != "none"

    def _twist_at(self, x: Tensor, j: int) -> Tensor:
        """Evaluate (and cache) ``log p~_j(y | x)``."""
        sp, y, ch = self.space, self.y, self.chain
        if j == self.last:
            self._tw = sp.log_likelihood(y, x, self.per_obs)
            return self._tw
        u = self._denoise_var(j)
        if self.twist in ("dps", "dps_only"):
            self._tw, self._grad = twist_gradient(
                x, lambda z: gaussian_twist(sp, y, ch.denoise(z, j), u, self.per_obs)
            )
        else:
            self._x, self._x_hat = x, ch.denoise(x, j)
            self._tw = gaussian_twist(sp, y, self._x_hat, u, self.per_obs)
        return self._tw

    def start(self, x: Tensor) -> Increment:
        """Weight of the initial draw ``x_{t_J}``: the twist at index 0."""
        if not self.guided:
            return Increment()
        tw = self._twist_at(x, 0)
        return Increment() if self.twist == "dps_only" else Increment(obs=tw)

    def step(
        self, x_t: Tensor, j: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Increment]:
        """Propose ``x_{t_{j+1}}`` from ``x_{t_j}``; returns it and its incremental log-weight
        ``log[p(x_s | x_t) p~_s(y | x_s) / (q(x_s | x_t, y) p~_t(y | x_t))]``."""
        if self._kern is not None and self._kern[0] == j:
            kern, self._kern = self._kern[1], None
        else:
            kern = self.chain.kernel(x_t, j)
        s = j + 1
        if s == self.last:  # the final kernel, for exact MCMC moves (assim.filters.dpf_moves)
            self.final_kernel = kern
        if self.space is None:
            return kern.sample(generator), Increment()
        if self.twist == "none":
            x_s = kern.sample(generator)
            if s < self.last:
                return x_s, Increment()
            return x_s, Increment(obs=self.space.log_likelihood(self.y, x_s, self.per_obs))
        tw_t = self._tw
        if self.twist == "gaussian":
            if s == self.last:
                prop = twisted_gaussian_proposal(
                    kern, self.space, self.y, kern.mean, None, None, generator, self.per_obs
                )
            else:
                u = self._denoise_var(s)
                kappa = tweedie_slope(self.chain, s, u)
                prop = twisted_gaussian_proposal(
                    kern, self.space, self.y, self._x_hat, kappa, u, generator, self.per_obs
                )
            tw_s = self._twist_at(prop.x, s)
            return prop.x, Increment(obs=prop.log_norm - prop.log_twist_lin + tw_s - tw_t)
        if bool((kern.var <= 0).any()):
            raise InputError("DPS guidance needs a stochastic sampler (kernel variance > 0)")
        q = dps_shift(kern, self._grad, self.dps_scale)
        x_s = q.sample(generator)
        tw_s = self._twist_at(x_s, s)
        if self.twist == "dps_only":
            return x_s, Increment()
        var = kern.var.expand_as(x_s)
        ratio = ((x_s - q.mean) ** 2 - (x_s - kern.mean) ** 2) / (2 * var)
        return x_s, Increment(state=ratio.reshape(x_s.shape[0], -1), obs=tw_s - tw_t)

    def reindex(self, chain: Any, idx: Tensor) -> None:
        """The particles were resampled with ancestors ``idx``; ``chain`` is rebuilt on the
        resampled conditions."""
        self._set_chain(chain)
        for name in ("_x_hat", "_tw", "_grad"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v[idx.to(v.device)])

    def stitch(self, chain: Any, gather: Callable[[Tensor], Tensor], j: int) -> bool:
        """Locally resampled particles ``x'[n, l] = x[idx_l[n], l]`` (``gather``) at index
        ``j``: take the denoised state and the old chain's kernel at ``j`` column by column
        from the ancestors instead of running the denoiser on the stitched particles, and
        recompute the twist from the stitched denoised state (no network call).

        Exact when the denoiser and the kernel act elementwise (then stitching commutes
        with them); for a network with a wider receptive field it replaces ``D(x')`` by the
        stitched ``D(x)`` near the seams -- an approximation on top of the local filter's.
        Gaussian twist only; returns ``False`` (nothing done: call :meth:`refresh`) else."""
        if self.twist != "gaussian" or not self.guided or self._x_hat is None or j >= self.last:
            return False
        kern = self.chain.kernel(self._x, j)  # the denoiser's memo: no second network call

        def g(t: Tensor) -> Tensor:
            t = torch.as_tensor(t)
            return gather(t.expand_as(self._x)) if t.dim() == self._x.dim() else t

        self._kern = (j, GaussianKernel(g(kern.mean), g(kern.var)))
        self._set_chain(chain)
        self._x_hat = gather(self._x_hat)
        self._x = None
        u = self._denoise_var(j)
        self._tw = gaussian_twist(self.space, self.y, self._x_hat, u, self.per_obs)
        return True

    def refresh(self, chain: Any, x: Tensor, j: int) -> None:
        """Recompute the cached twist at new particles ``x`` at index ``j``."""
        self._set_chain(chain)
        if self.guided:
            self._twist_at(x, j)
