"""The chain of one Markov step of a :class:`~models.worlds.rolling.Rolling` world as a
``TransitionChain`` of frame 0 (the frame that leaves the window); the other frames are
per-particle hidden state. See :mod:`models.worlds.rolling`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.diffusion.kernel import GaussianKernel

if TYPE_CHECKING:
    from models.worlds.rolling import Rolling


class RollingChain:
    """One Markov step of a :class:`Rolling` world as a ``TransitionChain`` of frame 0.

    Frame 0's chain variable in state units is ``x = m + s z / alpha`` (``alpha`` of its
    current level; ``alpha = 1`` for the EDM schedule), as in the conditional world.
    """

    def __init__(self, world: Rolling, x_k: Tensor) -> None:
        self.world = world
        self.ctx = world.encode(x_k)
        self.levels = world.levels(x_k.device)
        self.times = self.levels[:, 0]
        alpha, sigma = world._coef(self.times)
        self.alpha, self.ratio = alpha.to(x_k.dtype), (sigma / alpha).to(x_k.dtype)
        self.m, self.s = world.state_mean, world.state_std
        self.q_var = torch.full_like(self.s, getattr(world, "q", 0.0) ** 2)
        self.hidden: dict[int, Tensor] = {}
        self.eps: Tensor | None = None

    def _to_z(self, x: Tensor, j: int) -> Tensor:
        return self.alpha[j] * (x - self.m) / self.s

    def _to_x(self, z: Tensor, j: int) -> Tensor:
        return self.m + self.s * z / self.alpha[j]

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw the pure-noise window; returns frame 0 in state units. Also draws now the
        noise of the hidden frames for every step (so kernels are deterministic in
        ``x_t``)."""
        w, n = self.world, self.ctx.shape[0]
        z = w.prior((n, w.W, *w.state_shape), generator, self.ctx)
        steps = len(self.times) - 1
        self.eps = torch.randn(
            (steps, n, w.W - 1, *w.state_shape),
            generator=generator,
            device=z.device,
            dtype=z.dtype,
        )
        self.hidden = {0: z[:, 1:]}
        return self._to_x(z[:, 0], 0)

    def reindex(self, idx: Tensor) -> None:
        """Follow a resampling of the particles: ``idx`` ``(N,)`` (global ancestors) or
        ``(D, N)`` with ``D = prod(S)`` (per-location ancestors of a localised filter:
        grid point ``d`` of particle ``n`` comes from particle ``idx[d, n]``, in the hidden
        frames and the pre-drawn noise too)."""
        if idx.dim() == 1:
            pick = lambda t, dim: t.index_select(dim, idx)  # noqa: E731
        else:
            d = idx.shape[0]
            if d != self.ctx[0].numel():
                raise ValueError(
                    f"per-location idx has {d} rows, the grid has {self.ctx[0].numel()}"
                )

            def pick(t: Tensor, dim: int) -> Tensor:
                flat = t.reshape(*t.shape[: dim + 1], -1, d)  # (..., N, frames, D)
                ix = idx.T.reshape(*([1] * dim), idx.shape[1], 1, d).expand(
                    *flat.shape[:dim], -1, flat.shape[-2], -1
                )
                return torch.gather(flat, dim, ix.to(t.device)).reshape(t.shape)

        self.ctx = pick(self.ctx, 0)
        self.hidden = {j: pick(h, 0) for j, h in self.hidden.items()}
        if self.eps is not None:
            self.eps = pick(self.eps, 1)

    def _window(self, x_t: Tensor, j: int) -> Tensor:
        if j not in self.hidden:
            raise ValueError(
                f"RollingChain: no window state at index {j}; call init() and the kernels in "
                "order (after resampling use chain.reindex(idx) instead of a new chain)"
            )
        return torch.cat([self._to_z(x_t, j).unsqueeze(1), self.hidden[j]], 1)

    def kernel(self, x_t: Tensor, j: int) -> GaussianKernel:
        """Frame 0's DDPM kernel ``times[j] -> times[j+1]`` in state units; advances the
        hidden frames to ``j + 1`` with the noise drawn at :meth:`init`."""
        lv = self.levels
        mean, var, _ = self.world.window_kernel(self._window(x_t, j), lv[j], lv[j + 1], self.ctx)
        self.hidden[j + 1] = mean[:, 1:] + var[:, 1:].sqrt() * self.eps[j]
        a = self.alpha[j + 1]
        v = self.s**2 * var[0, 0] / a**2
        if j == len(self.times) - 2:
            v = v + self.q_var
        return GaussianKernel(self._to_x(mean[:, 0], j + 1), v)

    def denoise(self, x_t: Tensor, j: int) -> Tensor:
        """``E[x_{k+1} | window at index j]`` (frame 0 of the window's ``x0_hat``)."""
        if j in (len(self.times) - 1, -1):
            return x_t
        x0 = self.world.denoise_window(self._window(x_t, j), self.levels[j], self.ctx)
        return self.world.decode(x0[:, 0])

    def denoise_var(self, j: int) -> Tensor:
        """Variance of ``x_{k+1}`` around :meth:`denoise` at index ``j``, plus the
        model-error variance ``q^2``; ``q^2`` at the last index. A calibrated world
        (:meth:`Rolling.calibrate`) uses its measured mean squared error ``s^2 mse_j``;
        otherwise the Gaussian (Tweedie) value ``s^2 r^2 s_d^2 / (r^2 + s_d^2)`` at frame
        0's level, which ignores the clean context frame and so overstates the variance
        early in the chain (L96: 13 against a measured 0.07)."""
        if j in (len(self.times) - 1, -1):
            return self.q_var
        cal = self.world.cal_mse[j]
        if bool(torch.isfinite(cal)):
            return self.s**2 * cal.to(self.s.dtype) + self.q_var
        r2, sd2 = self.ratio[j] ** 2, self.world.sigma_data**2
        return self.s**2 * r2 * sd2 / (r2 + sd2) + self.q_var

    def run(self, generator: torch.Generator | None = None) -> Tensor:
        """``init`` then every kernel; returns ``x_{k+1}``."""
        x = self.init(generator)
        for j in range(len(self.times) - 1):
            x = self.kernel(x, j).sample(generator)
        return x
