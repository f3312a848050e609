"""The chain of one physical step of :class:`~models.worlds.conditional.Conditional` in
state space (``TransitionChain``), with the one-entry denoiser memo that lets a guided
filter evaluate the network once per ``(x_t, j)``. See the module docstring of
:mod:`models.worlds.conditional` for the change of variables and the model error ``q``."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.diffusion.kernel import GaussianKernel

if TYPE_CHECKING:
    from models.worlds.conditional import Conditional


class _MemoDenoiser:
    """The world's denoiser with a one-entry memo (per chain).

    A guided filter evaluates ``D(z_t, t_j)`` for its twist (:meth:`ConditionalChain.denoise`)
    and the sampler's kernel evaluates it again on the same input; the memo returns the
    stored output when ``t``, ``cond`` and ``z`` (bitwise, ``torch.equal``) all match, so
    results are bit-identical to recomputing. Inputs that require a gradient (DPS) bypass
    the memo."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.den = denoiser
        self.schedule = denoiser.schedule
        self.sigma_data = getattr(denoiser, "sigma_data", 1.0)
        self._key: tuple | None = None
        self._z: Tensor | None = None
        self._out: Tensor | None = None

    def __call__(self, z: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() and z.requires_grad:
            return self.den(z, t, cond)
        key = (float(torch.as_tensor(t).reshape(-1)[0]), id(cond), tuple(z.shape), z.dtype)
        if key == self._key and torch.equal(z, self._z):
            return self._out
        out = self.den(z, t, cond)
        self._key, self._z, self._out = key, z.detach(), out.detach()
        return out

    def reindex(self, idx: Tensor, cond: Tensor | None) -> None:
        """Gather the memo's rows (whole-particle resampling), keyed to the new ``cond``."""
        if self._key is not None:
            t, _, _, dtype = self._key
            self._z, self._out = self._z[idx], self._out[idx]
            self._key = (t, id(cond), tuple(self._z.shape), dtype)

    def clear(self) -> None:
        self._key = self._z = self._out = None


class ConditionalChain:
    """One physical step as a diffusion chain in state space (``TransitionChain``).

    The chain's sampler is a shallow copy of the world's whose denoiser carries a
    one-entry memo (:class:`_MemoDenoiser`): :meth:`denoise` then :meth:`kernel` at the
    same ``(x_t, j)`` runs the network once."""

    def __init__(self, world: Conditional, window: Tensor) -> None:
        self.world = world
        self.sampler = copy.copy(world.sampler)
        self.sampler.denoiser = self._den = _MemoDenoiser(world.denoiser)
        sched = world.denoiser.schedule
        dev, dt = window.device, window.dtype
        self.cond = world.encode_cond(window)
        self.o = world.offset(window)
        self.s = world.target_std
        t_min = 0.0
        if world.q > 0:
            ratio = world.q / float(self.s.pow(2).mean().sqrt())
            r_lo, r_hi = (float(sched.sigma_ratio(t)) for t in (0.0, 1.0))
            if not r_lo <= ratio < r_hi:
                raise ValueError(
                    f"model-error level q={world.q} is {ratio:.3g} in normalised units, outside "
                    f"the schedule's noise range [{r_lo:.3g}, {r_hi:.3g})"
                )
            t_min = float(sched.t_of_sigma_ratio(ratio))
        self.times = world.sampler.timesteps(world.steps, t_min, device=dev)
        alpha, sigma = sched(self.times)
        self.alpha = alpha.to(dt)
        self.ratio = (sigma / alpha).to(dt)
        self.q_var = (self.s * self.ratio[-1]) ** 2 if world.q > 0 else torch.zeros_like(self.s)
        self.shape = self.o.shape

    def _to_z(self, x: Tensor, j: int) -> Tensor:
        return self.alpha[j] * (x - self.o) / self.s

    def _to_x(self, z: Tensor, j: int) -> Tensor:
        return self.o + self.s * z / self.alpha[j]

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """``x_{t_J}``: the sampler's prior draw mapped to state space."""
        z = self.sampler.init(
            self.shape, float(self.times[0]), generator, device=self.o.device, dtype=self.o.dtype
        )
        return self._to_x(z, 0)

    def kernel(self, x_t: Tensor, j: int) -> GaussianKernel:
        """Kernel of ``times[j] -> times[j+1]`` in state units (exact affine map)."""
        k = self.sampler.transition(self._to_z(x_t, j), self.times[j], self.times[j + 1], self.cond)
        a = self.alpha[j + 1]
        return GaussianKernel(self.o + self.s * k.mean / a, self.s**2 * k.var / a**2)

    def denoise(self, x_t: Tensor, j: int) -> Tensor:
        """``E[x_{k+1} | x_{t_j}] = o + s D(z_t, t_j, cond)``."""
        return self.o + self.s * self._den(self._to_z(x_t, j), self.times[j], self.cond)

    def noise_var(self, j: int) -> Tensor:
        """State-space noise variance of ``x_{t_j}`` around the clean step ``x_{k+1}``:
        ``x_t = o + s z_t / alpha_t = x_{k+1} + s r_t eps``, so ``(s r_{t_j})^2`` (shape
        ``S``; at the last index it is the model-error variance ``q^2`` when ``q > 0``)."""
        return (self.s * self.ratio[j]) ** 2

    def denoise_var(self, j: int) -> Tensor:
        """``s^2 r2(r_{t_j}) + q^2`` for ``j < J``; ``q^2`` at the last index (shape ``S``)."""
        last = len(self.times) - 1
        if j in (last, -1):
            return self.q_var
        return self.s**2 * self.world.posterior_var(self.ratio[j]) + self.q_var

    def reindex(self, idx: Tensor) -> None:
        """Follow a resampling of the particles: the chain of ``x_k[idx]``, without a
        rebuild (so without a new network call at the current diffusion index).

        ``idx`` ``(N,)`` picks whole particles: ``cond``, ``o`` and the denoiser memo are
        gathered, so a denoise at the same ``(x_t[idx], t_j)`` reuses the stored network
        output (bit-identical: the memo compares inputs bitwise). ``idx`` ``(D, N)``
        (localised resampling, per grid point ``d`` of ``S``) gathers ``cond`` and ``o``
        per grid point, which equals rebuilding from the per-point gathered ``x_k``
        because both are elementwise in the window; the memo is dropped."""
        n = self.o.shape[0]
        idx = idx.to(self.o.device)
        if idx.dim() == 1:
            self.cond, self.o = self.cond[idx], self.o[idx]
            self._den.reindex(idx, self.cond)
            return

        def cols(t: Tensor) -> Tensor:  # (N, ..., *S) gathered per grid point
            flat = t.reshape(n, -1, idx.shape[0])
            return torch.gather(flat, 0, idx.T[:, None].expand_as(flat)).reshape(t.shape)

        self.cond, self.o = cols(self.cond), cols(self.o)
        self._den.clear()

    def run(self, generator: torch.Generator | None = None) -> Tensor:
        """Sample the whole chain: ``init`` then every kernel; returns ``x_{t_0}``."""
        x = self.init(generator)
        for j in range(len(self.times) - 1):
            x = self.kernel(x, j).sample(generator)
        return x
