"""Exact MCMC rejuvenation of the last diffusion step (resample-move, Gilks & Berzuini 2001).

At the last index of the chain the path target of the diffusion particle filter, given
everything up to ``x_{t_{J-1}}`` (the ancestor), is

    pi(x | ancestor) ∝ N(x; m, diag v) g(y | x),

with ``N(m, diag v)`` the world's final kernel (for a learned world: the denoised step
plus the model-error noise ``q^2``) and ``g`` the exact likelihood. Both factors are
known in closed form, so a Metropolis–Hastings move that leaves this conditional
invariant needs no network call. A kernel that leaves ``pi(x | ancestor)`` invariant
leaves the joint path target invariant, so applying it to weighted particles changes
neither the weights nor the consistency of the SMC (Chopin & Papaspiliopoulos 2020,
ch. 17; Del Moral, Doucet & Jasra 2006).

The move is preconditioned Crank–Nicolson (Cotter, Roberts, Stuart & White 2013):
``x' = m + sqrt(1 - beta^2) (x - m) + beta v^{1/2} xi``. It is reversible with respect
to ``N(m, diag v)``, so the acceptance ratio is the likelihood ratio ``g(y | x') / g(y |
x)`` alone. **Blockwise acceptance:** when the rows of ``H`` have disjoint supports and
``R`` is diagonal (:attr:`ObsSpace.diagonal`), ``pi`` factorises into independent blocks
(the support of each observation; every unobserved element is a block of its own, with
likelihood ratio 1), so one acceptance test per block is the product of exact MH kernels
-- still exact, and far more efficient than one test for the whole state. Otherwise one
test per particle.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from assim.errors import InputError
from assim.obs_space import ObsSpace
from assim.rng import rand, randn
from models.diffusion.kernel import GaussianKernel

__all__ = ["pcn_moves"]


def pcn_moves(
    x: Tensor,
    kernel: GaussianKernel,
    space: ObsSpace,
    y: Tensor,
    n_moves: int,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
    blockwise: bool = True,
) -> tuple[Tensor, float]:
    """``n_moves`` pCN Metropolis–Hastings moves of ``x`` ``(N, *S)`` targeting
    ``N(x; kernel.mean, diag kernel.var) g(y | x)`` independently per particle.

    ``y`` ``(m,)`` are the observed entries of ``space``. ``beta`` in ``(0, 1]`` is the
    step (``1``: independent draws from the kernel). ``blockwise`` uses one acceptance
    test per observation block when ``space.diagonal`` (module doc). Returns the moved
    particles and the mean acceptance rate (per block, or per particle)."""
    if not 0.0 < float(beta) <= 1.0:
        raise InputError(f"move_beta must lie in (0, 1], got {beta!r}")
    if int(n_moves) < 0:
        raise InputError(f"moves must be >= 0, got {n_moves!r}")
    n = x.shape[0]
    mean = kernel.mean.expand_as(x).reshape(n, -1)
    sd = kernel.var.clamp_min(0).sqrt().expand_as(x).reshape(n, -1)
    cur = x.reshape(n, -1)
    blocks = blockwise and space.diagonal
    support = (space.H != 0).to(cur.dtype) if blocks else None  # (m, d)
    free = None if support is None else support.sum(0) == 0  # unobserved elements
    rho = math.sqrt(1.0 - float(beta) ** 2)

    def loglik(z: Tensor) -> Tensor:
        return space.log_likelihood(y, z.reshape(x.shape), per_obs=blocks)

    ll = loglik(cur)
    accepted, tests = 0.0, 0
    for _ in range(int(n_moves)):
        xi = randn(cur.shape, generator, device=cur.device, dtype=cur.dtype)
        prop = mean + rho * (cur - mean) + float(beta) * sd * xi
        ll_prop = loglik(prop)
        log_u = rand(ll.shape, generator, device=cur.device, dtype=cur.dtype).log()
        acc = log_u < ll_prop - ll  # (N, m) per block or (N,) per particle
        ll = torch.where(acc, ll_prop, ll)
        if support is None:
            take = acc.unsqueeze(1)
        else:
            take = ((acc.to(cur.dtype) @ support) > 0) | free
        cur = torch.where(take, prop, cur)
        accepted += float(acc.to(cur.dtype).sum())
        tests += acc.numel()
    return cur.reshape(x.shape), accepted / tests if tests else math.nan
