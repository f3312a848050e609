"""Look-ahead particle filter over an observation window (sparse-in-time observations).

When observations come every ``L`` model steps (Lorenz-63 of BENCHMARKS.md: ``L = 25``) a
particle filter whose model error ``q`` is injected at every step and guided only at the
observed step is nearly a bootstrap filter: the ``L - 1`` unguided injections diffuse the
particles by about ``sqrt(L) q`` and the final guided step can only move them by ``q``.
This module instead uses the state-space model

    x_{k+1} ~ K_q(x_k)                       (one stochastic step: model error q)
    x_{k+j+1} = F(x_{k+j}),  j = 1 .. L-1    (deterministic steps)
    y_{k+L} ~ g(y | h(x_{k+L}))

i.e. the model error of the whole window is injected once, at its first step
(``inject="first"``), or at the observed step itself (``inject="last"``, the optimal
proposal with regularisation ``q``). ``K_q`` is a Gaussian kernel ``N(m, diag v)``: for
the true model ``N(M(x), q^2 I)`` (:class:`PhysicalFlow`); for a learned conditional
diffusion world the last kernel of its reverse chain stopped at noise level ``q``
(:class:`DiffusionFlow`; the earlier diffusion steps are sampled from the chain, so the
path weights stay exact), and ``F`` is the chain's noise-free path (every kernel's mean,
from the prior mean).

**Proposal** (a look-ahead twist). The observation is pulled back to the injection step
through the linearised remaining flow: with ``G(x) = h(F^{r}(x))`` (``r`` remaining
steps) and ``A = dG/dx`` at ``x_lin`` (central finite differences of ``F^{r}`` times the
operator's Jacobian), the proposal is the Gaussian

    q(x) ∝ N(x; m, V) N(y; G(x_lin) + A (x - x_lin), R)   =  N(x; mu, P),
    P^{-1} = V^{-1} + A^T R^{-1} A,   mu = P (V^{-1} m + A^T R^{-1} (y - G(x_lin) + A x_lin)),

the locally optimal proposal of the linearised window (Doucet, Godsill & Andrieu 2000).
``iters`` Gauss–Newton passes re-linearise at ``x_lin = mu`` (``iters > 1``: a Laplace
proposal, as in implicit particle filters, Chorin & Tu 2009); ``iters = 0`` proposes from
``K_q`` itself (bootstrap). Whatever the linearisation, the incremental weight is exact:

    w = N(x; m, V) g(y | h(F^{r}(x))) / N(x; mu, c P)

(``c = inflation`` widens the proposal), so the filter is a consistent SMC for the model
above (``N -> inf``), and ``log sum_i W_i w_i`` estimates ``log p(y | past)`` without bias
in ``exp``. Cost: ``(1 + 2d)`` propagations of the window per Gauss–Newton pass -- meant
for small state dimensions (``d`` of Lorenz-63).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.rng import rand, randn
from assim.smc import WeightCollapse, ess, get_resampler, maybe_resample, normalize, reweight
from models.diffusion.kernel import GaussianKernel

__all__ = ["DiffusionFlow", "LookaheadPF", "PhysicalFlow", "fd_jacobian"]


class PhysicalFlow:
    """The true model: ``F = world.deterministic_step``, ``K_q(x) = N(M(x), q^2 I)``."""

    def __init__(self, world: Any) -> None:
        if not hasattr(world, "deterministic_step"):
            raise InputError(f"PhysicalFlow needs deterministic_step, got {type(world).__name__}")
        self.world = world

    def mean_step(self, x: Tensor) -> Tensor:
        """``M(x)``, ``(N, *S) -> (N, *S)``."""
        return self.world.deterministic_step(x)

    def kernel(
        self, x: Tensor, q: float, generator: torch.Generator | None = None
    ) -> GaussianKernel:
        """``N(M(x), q^2)`` per element."""
        m = self.mean_step(x)
        return GaussianKernel(m, torch.full_like(m, float(q) ** 2))


class DiffusionFlow:
    """A learned conditional diffusion world (:class:`~models.worlds.conditional.Conditional`).

    ``mean_step``: the reverse chain's noise-free path -- start at the prior mean
    ``x_{t_J} = o`` (the chain's offset) and take every kernel's mean (deterministic,
    smooth in ``x``). ``kernel(x, q)``: the chain stopped at model-error level ``q`` (world
    ``configure(q=q)``), sampled through all but its last step, and that last step's kernel
    ``N(m, v)`` with ``v ~ q^2`` (the kernel of a sampled path: exact path weights).
    ``steps`` diffusion steps per physical step (``None``: the world's)."""

    def __init__(self, world: Any, steps: int | None = None) -> None:
        if not hasattr(world, "configure") or not hasattr(world, "transition_sampler"):
            raise InputError(
                f"DiffusionFlow needs a learned diffusion world (configure, transition_sampler), "
                f"got {type(world).__name__}"
            )
        self.world = world
        self.steps = int(world.steps if steps is None else steps)
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")

    def _chain(self, x: Tensor, q: float) -> Any:
        if self.world.q != q or self.world.steps != self.steps:
            self.world.configure(steps=self.steps, q=q)
        return self.world.transition_sampler(x)

    def mean_step(self, x: Tensor) -> Tensor:
        chain = self._chain(x, 0.0)
        z = chain.o.clone()
        for j in range(len(chain.times) - 1):
            z = chain.kernel(z, j).mean
        return z

    def kernel(
        self, x: Tensor, q: float, generator: torch.Generator | None = None
    ) -> GaussianKernel:
        if not q > 0:
            raise InputError(f"the injection step needs a model-error level q > 0, got {q}")
        chain = self._chain(x, float(q))
        z = chain.init(generator)
        last = len(chain.times) - 1
        for j in range(last - 1):
            z = chain.kernel(z, j).sample(generator)
        k = chain.kernel(z, last - 1)
        return GaussianKernel(k.mean, k.var.expand_as(k.mean))


def _mvn_logpdf(resid: Tensor, cov: Tensor) -> Tensor:
    """``log N(resid; 0, cov)`` for ``resid`` ``(N, m)``, ``cov`` ``(N, m, m)``."""
    chol, _ = torch.linalg.cholesky_ex(cov)
    z = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    return -0.5 * (z**2).sum(1) - logdet - 0.5 * resid.shape[1] * math.log(2 * math.pi)


def _chol_logpdf(x: Tensor, mu: Tensor, chol: Tensor, inflation: float) -> Tensor:
    """``log N(x; mu, c P)`` with ``P^{-1} = L L^T`` (``chol = L``), ``c = inflation``."""
    z = (chol.transpose(1, 2) @ (x - mu).unsqueeze(-1)).squeeze(-1)
    d = x.shape[1]
    logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    return -0.5 * (z**2).sum(1) / inflation + logdet - 0.5 * d * math.log(2 * math.pi * inflation)


def _diag_logpdf(x: Tensor, m: Tensor, v: Tensor) -> Tensor:
    return -0.5 * ((x - m) ** 2 / v + torch.log(2 * math.pi * v)).sum(1)


def _categorical(log_p: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of the normalised log-probabilities ``(N, C)``."""
    u = rand((log_p.shape[0], 1), generator, device=log_p.device, dtype=log_p.dtype)
    c = torch.cumsum(log_p.exp(), 1)
    return torch.searchsorted(c / c[:, -1:], u, right=True).squeeze(1).clamp_max(log_p.shape[1] - 1)


def _flow(flow: Any, x: Tensor, steps: int) -> Tensor:
    for _ in range(steps):
        x = flow.mean_step(x)
    return x


def fd_jacobian(
    flow: Any, x: Tensor, steps: int, eps: float, scheme: str = "central"
) -> tuple[Tensor, Tensor]:
    """``F^{steps}(x)`` ``(N, *S)`` and its Jacobian ``(N, d, d)`` by finite differences
    with step ``eps``: ``scheme="central"`` ``(F(x + eps e_i) - F(x - eps e_i)) / 2 eps``
    (one batched propagation of ``(1 + 2d) N`` states, error ``O(eps^2)``) or
    ``"forward"`` ``(F(x + eps e_i) - F(x)) / eps`` (``(1 + d) N`` states, error
    ``O(eps)``). Both are exact for an affine ``F``. ``steps = 0``: ``x`` and the identity."""
    if scheme not in ("central", "forward"):
        raise InputError(f"fd scheme must be 'central' or 'forward', got {scheme!r}")
    n, shape = x.shape[0], x.shape[1:]
    d = math.prod(shape)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if steps == 0:
        return x, eye.expand(n, d, d)
    flat = x.reshape(n, 1, d)
    shifts = [flat + eps * eye] + ([flat - eps * eye] if scheme == "central" else [])
    batch = torch.cat([flat, *shifts], 1)  # (N, 1 + 2d or 1 + d, d)
    k = batch.shape[1]
    out = _flow(flow, batch.reshape(n * k, *shape), steps).reshape(n, k, d)
    if scheme == "central":
        jac = (out[:, 1 : 1 + d] - out[:, 1 + d :]).transpose(1, 2) / (2 * eps)
    else:
        jac = (out[:, 1:] - out[:, :1]).transpose(1, 2) / eps
    return out[:, 0].reshape(x.shape), jac


class LookaheadPF:
    """Particle filter over observation windows with a look-ahead Gaussian proposal.

    Args:
        q: model-error standard deviation injected once per window (``> 0``).
        inject: ``"first"`` (first step of the window: the proposal looks ``L - 1`` steps
            ahead) or ``"last"`` (the observed step: the plain optimal proposal).
        iters: Gauss–Newton linearisations of the proposal (0: bootstrap, 1: linearised
            optimal proposal, > 1: Laplace proposal).
        inflation: proposal covariance factor ``c`` (``>= 1`` gives heavier coverage).
        ess_threshold: resample at the start of a window when ``ESS < threshold N``.
        scheme: resampling scheme of :mod:`assim.smc`.
        fd_eps: finite-difference step for the flow's Jacobian (state units).
        fd: ``"central"`` or ``"forward"`` differences (:func:`fd_jacobian`; forward costs
            ``1 + d`` instead of ``1 + 2d`` propagations per linearisation point).
        linearise: ``"particle"`` (the flow linearised at every particle's own point:
            ``(1 + 2d) N`` propagations per pass) or ``"mean"`` (the flow ``F^{r}``
            linearised once at the mean of the kernel means, ``F(x) ~ F(x_bar) + J (x -
            x_bar)``, shared by all particles -- ``1 + 2d`` propagations; the observation
            operator stays nonlinear in the Gauss–Newton passes).
        mix, mix_scale: heavy-tailed model error ``(1 - mix) K_q + mix K_{mix_scale q}``
            (``K_{kq}``: the kernel with its variance times ``k^2``); 0 (default) is the
            plain kernel. The proposal is the mixture of the two Gauss–Newton proposals
            with component probabilities ``∝ mix_c * Z_c`` (``Z_c`` the linearised evidence),
            so a filter that drifted off the truth can jump back while the small component
            keeps the accuracy of a small ``q``.
    Weights stay exact for the window model (module doc) whatever the options.
    """

    name = "lookahead-pf"

    def __init__(
        self,
        q: float,
        inject: str = "first",
        iters: int = 1,
        inflation: float = 1.0,
        ess_threshold: float = 0.5,
        scheme: str = "systematic",
        fd_eps: float = 1e-2,
        linearise: str = "particle",
        mix: float = 0.0,
        mix_scale: float = 10.0,
        fd: str = "central",
    ) -> None:
        if not (q > 0 and math.isfinite(q)):
            raise InputError(f"q must be a finite number > 0, got {q!r}")
        if inject not in ("first", "last"):
            raise InputError(f"inject must be 'first' or 'last', got {inject!r}")
        if int(iters) < 0:
            raise InputError(f"iters must be >= 0, got {iters!r}")
        if not (inflation > 0 and math.isfinite(inflation)):
            raise InputError(f"inflation must be a finite number > 0, got {inflation!r}")
        if not (fd_eps > 0):
            raise InputError(f"fd_eps must be > 0, got {fd_eps!r}")
        if linearise not in ("particle", "mean"):
            raise InputError(f"linearise must be 'particle' or 'mean', got {linearise!r}")
        if not (0.0 <= mix < 1.0) or not (mix_scale > 0 and math.isfinite(mix_scale)):
            raise InputError(f"need 0 <= mix < 1 and mix_scale > 0, got {mix!r}, {mix_scale!r}")
        if fd not in ("central", "forward"):
            raise InputError(f"fd must be 'central' or 'forward', got {fd!r}")
        get_resampler(scheme)
        self.fd = fd
        self.linearise, self.mix, self.mix_scale = linearise, float(mix), float(mix_scale)
        self.q, self.inject, self.iters = float(q), inject, int(iters)
        self.inflation, self.ess_threshold = float(inflation), float(ess_threshold)
        self.scheme, self.fd_eps = scheme, float(fd_eps)

    def __repr__(self) -> str:
        return (
            f"LookaheadPF(q={self.q}, inject={self.inject!r}, iters={self.iters}, "
            f"inflation={self.inflation}, ess_threshold={self.ess_threshold}, "
            f"linearise={self.linearise!r}, mix={self.mix}, mix_scale={self.mix_scale}, "
            f"fd={self.fd!r})"
        )

    def _linearise(self, flow: Any, x_lin: Tensor, shape, r: int, lin: dict) -> tuple:
        """``F^{r}(x_lin)`` and its Jacobian ``(N, d, d)`` (``lin`` caches the shared
        linearisation of ``"mean"`` mode and the first pass of ``"particle"`` mode)."""
        n = x_lin.shape[0]
        if self.linearise == "mean":
            if "bar" not in lin:
                x_bar = lin["m"].mean(0, keepdim=True)
                f_bar, j_bar = fd_jacobian(flow, x_bar.reshape(1, *shape), r, self.fd_eps, self.fd)
                lin["bar"] = (x_bar, f_bar.reshape(1, -1), j_bar[0])
            x_bar, f_bar, j_bar = lin["bar"]
            return (f_bar + (x_lin - x_bar) @ j_bar.T).reshape(n, *shape), j_bar.expand(n, -1, -1)
        if x_lin is lin["m"]:
            if "first" not in lin:
                lin["first"] = fd_jacobian(flow, x_lin.reshape(n, *shape), r, self.fd_eps, self.fd)
            return lin["first"]
        return fd_jacobian(flow, x_lin.reshape(n, *shape), r, self.fd_eps, self.fd)

    def _proposal(
        self, flow: Any, v: Tensor, y: Tensor, obs: Any, r: int, shape, lin: dict
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gauss–Newton proposal for the prior ``N(m, diag v)`` (``m = lin["m"]`` ``(N, d)``):
        mean ``(N, d)``, Cholesky factor ``L`` of ``P^{-1} = L L^T`` ``(N, d, d)`` and the
        linearised evidence ``log N(y; G(x_lin) + A (m - x_lin), R + A V A^T)`` ``(N,)``."""
        mf = lin["m"]
        r_mat = obs.noise.covariance(y.shape[0]).to(dtype=mf.dtype, device=mf.device)
        r_inv = torch.linalg.inv(r_mat)
        x_lin, mu = mf, mf
        prec_chol = torch.diag_embed(v.rsqrt())
        log_z = torch.zeros(mf.shape[0], dtype=mf.dtype, device=mf.device)
        for _ in range(self.iters):
            fx, jf = self._linearise(flow, x_lin, shape, r, lin)
            hx = obs.h(fx)
            a = obs.operator.jacobian(fx).to(mf.dtype) @ jf  # (N, m, d)
            at_rinv = a.transpose(1, 2) @ r_inv
            prec = torch.diag_embed(1.0 / v) + at_rinv @ a
            off = y - hx + (a @ x_lin.unsqueeze(-1)).squeeze(-1)
            rhs = mf / v + (at_rinv @ off.unsqueeze(-1)).squeeze(-1)
            chol, info = torch.linalg.cholesky_ex(prec)
            ok = (info == 0) & torch.isfinite(rhs).all(1) & torch.isfinite(chol).flatten(1).all(1)
            sol = torch.cholesky_solve(
                rhs.unsqueeze(-1), torch.where(ok[:, None, None], chol, prec_chol)
            ).squeeze(-1)
            # a failed linearisation (non-finite flow) keeps the previous proposal
            mu = torch.where(ok[:, None], sol, mu)
            prec_chol = torch.where(ok[:, None, None], chol, prec_chol)
            x_lin = mu
            cov = r_mat + (a * v.unsqueeze(1)) @ a.transpose(1, 2)
            resid = off - (a @ mf.unsqueeze(-1)).squeeze(-1)
            lz = _mvn_logpdf(resid, cov)
            log_z = torch.where(ok & torch.isfinite(lz), lz, log_z)
        return mu, prec_chol, log_z

    @torch.no_grad()
    def window(
        self,
        flow: Any,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        steps: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Advance ``steps`` model steps to the next observation ``y`` ``(m,)`` and weight.

        ``ensemble`` holds the (weighted) particles ``(N, *S)`` at the previous analysis
        time; returns the weighted particles at the observation time and ``info`` with
        ``ess`` (after weighting), ``log_z`` (evidence increment), ``resampled``."""
        if steps < 1:
            raise InputError(f"steps (model steps per window) must be >= 1, got {steps}")
        n = ensemble.size
        log_w = normalize(ensemble.log_w)[0]
        ens, log_w, resampled = maybe_resample(
            ensemble, log_w, self.ess_threshold, self.scheme, generator
        )
        x = ens.x
        y = torch.as_tensor(y, dtype=x.dtype, device=x.device).reshape(-1)
        seen = ~torch.isnan(y)
        if not bool(seen.any()):
            x = _flow(flow, flow.kernel(x, self.q, generator).sample(generator), steps - 1)
            return Ensemble(x, log_w), {"ess": float(ess(log_w)), "log_z": 0.0,
                                        "resampled": resampled}  # fmt: skip
        if not bool(seen.all()):
            obs, y = obs.subset(seen), y[seen]
        if self.inject == "first":
            kern, r = flow.kernel(x, self.q, generator), steps - 1
        else:
            kern, r = flow.kernel(_flow(flow, x, steps - 1), self.q, generator), 0
        mf = kern.mean.reshape(n, -1)
        v = kern.var.expand_as(kern.mean).reshape(n, -1)
        # mixture model error: (1 - mix) N(m, V) + mix N(m, mix_scale^2 V)
        comps = [(1.0 - self.mix, 1.0)] + ([(self.mix, self.mix_scale**2)] if self.mix else [])
        log_pi = torch.tensor([math.log(p) for p, _ in comps], dtype=mf.dtype, device=mf.device)
        if self.iters == 0:  # bootstrap: propose from the model itself
            c_idx = _categorical(log_pi.expand(n, -1), generator)
            scale = torch.tensor([s for _, s in comps], dtype=mf.dtype, device=mf.device)
            eps = randn(mf.shape, generator, device=mf.device, dtype=mf.dtype)
            xf = mf + (scale[c_idx].unsqueeze(1) * v).sqrt() * eps
            log_q = None
        else:
            lin: dict = {"m": mf}
            props = [self._proposal(flow, v * sc, y, obs, r, kern.mean.shape[1:], lin)
                     for _, sc in comps]  # fmt: skip
            log_rho = log_pi + torch.stack([p[2] for p in props], 1)  # (N, C)
            log_rho = log_rho - torch.logsumexp(log_rho, 1, keepdim=True)
            log_rho = torch.nan_to_num(log_rho, nan=-math.inf)
            bad = ~torch.isfinite(torch.logsumexp(log_rho, 1))
            log_rho = torch.where(bad[:, None], log_pi.expand(n, -1), log_rho)
            c_idx = _categorical(log_rho, generator)
            mu = torch.stack([p[0] for p in props], 1)[torch.arange(n), c_idx]
            chol = torch.stack([p[1] for p in props], 1)[torch.arange(n), c_idx]
            eps = randn(mu.shape, generator, device=mu.device, dtype=mu.dtype)
            c = math.sqrt(self.inflation)
            # x = mu + c L^{-T} eps has covariance c^2 P (P^{-1} = L L^T)
            dev = torch.linalg.solve_triangular(chol.transpose(1, 2), eps.unsqueeze(-1), upper=True)
            xf = mu + c * dev.squeeze(-1)
            log_q = torch.logsumexp(
                torch.stack([_chol_logpdf(xf, p[0], p[1], self.inflation) for p in props], 1)
                + log_rho,
                1,
            )
        log_pc = torch.stack([_diag_logpdf(xf, mf, v * sc) for _, sc in comps], 1) + log_pi
        log_p = torch.logsumexp(log_pc, 1)
        if log_q is None:
            log_q = log_p
        xs = xf.reshape(kern.mean.shape)
        x_obs = _flow(flow, xs, r)
        log_incr = log_p - log_q + obs.log_likelihood(y, x_obs)
        # a particle whose state blew up (a proposal far off the attractor) gets weight zero
        # and a zero state, so that weighted means stay finite
        bad = ~torch.isfinite(x_obs.reshape(n, -1)).all(1) | torch.isnan(log_incr)
        log_incr = torch.where(bad, torch.full_like(log_incr, -math.inf), log_incr)
        x_obs = torch.where(bad.reshape(n, *([1] * (x_obs.dim() - 1))), 0.0, x_obs)
        try:
            log_w, log_z = reweight(log_w, log_incr)
            collapsed = False
        except WeightCollapse:
            log_w = torch.full_like(log_w, -math.log(n))
            log_z, collapsed = torch.tensor(-math.inf), True
        # posterior probability of the wide component: sum_i W_i P(wide | x_i)
        resp = torch.nan_to_num((log_pc[:, -1] - log_p).exp()) if self.mix else 0.0 * log_p
        info = {"ess": float(ess(log_w)), "log_z": float(log_z), "resampled": resampled,
                "collapsed": collapsed, "wide_prob": float((log_w.exp() * resp).sum())}  # fmt: skip
        return Ensemble(x_obs, log_w), info
