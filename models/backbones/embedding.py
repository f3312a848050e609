"""Diffusion-time embedding and small shared helpers for the backbones.

Every backbone has the signature ``F(x_in, c_noise, cond) -> out`` used by
:class:`~models.diffusion.denoisers.Denoiser`: ``c_noise = log(sigma / alpha) / 4`` of shape
``(B,)`` is embedded with fixed Fourier features (Tancik et al. 2020; the "positional"
noise embedding of Karras et al. 2022) followed by a two-layer MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierEmbedding(nn.Module):
    """``c (B,) -> [cos(w_k c), sin(w_k c)]_k`` of shape ``(B, dim)``.

    Frequencies ``w_k`` are geometric in ``[min_freq, max_freq]`` (radians per unit of
    ``c_noise``; ``c_noise`` spans about ``[-1.6, 1.3]`` for ``sigma / alpha`` in
    ``[0.002, 150]``).
    """

    def __init__(self, dim: int = 64, min_freq: float = 0.5, max_freq: float = 100.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding: dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs)

    def forward(self, c: Tensor) -> Tensor:
        arg = c.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.cos(), arg.sin()], dim=-1)


class TimeEmbedding(nn.Module):
    """Fourier features of ``c_noise`` then ``Linear -> SiLU -> Linear``: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int = 64, fourier_dim: int = 64) -> None:
        super().__init__()
        self.fourier = FourierEmbedding(fourier_dim)
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        c_noise = torch.as_tensor(c_noise, device=self.fourier.freqs.device)
        return self.mlp(self.fourier(c_noise).to(self.mlp[0].weight.dtype))


def expand_noise(c_noise: Tensor, batch: int) -> Tensor:
    """``c_noise`` as ``(batch,)`` (a scalar is broadcast)."""
    c_noise = torch.as_tensor(c_noise)
    return c_noise.reshape(-1).expand(batch) if c_noise.numel() == 1 else c_noise.reshape(batch)


def with_channels(x: Tensor, spatial_ndim: int, name: str) -> Tensor:
    """Add a channel axis to ``(B, *spatial)``; leave ``(B, C, *spatial)`` alone."""
    if x.ndim == 1 + spatial_ndim:
        return x.unsqueeze(1)
    if x.ndim == 2 + spatial_ndim:
        return x
    raise ValueError(
        f"{name} must have shape (B, *spatial) or (B, C, *spatial) with {spatial_ndim} spatial "
        f"dims, got {tuple(x.shape)}"
    )


def cat_cond(
    x: Tensor, cond: Tensor | None, cond_channels: int, spatial_ndim: int, who: str
) -> Tensor:
    """Concatenate context channels ``cond`` ``(B, Cc, *spatial)`` (or ``(B, *spatial)``) to
    ``x`` ``(B, C, *spatial)`` along channels, checking the count against ``cond_channels``."""
    if cond_channels == 0:
        if cond is not None:
            raise ValueError(f"{who}: got cond but the backbone was built with cond_channels=0")
        return x
    if cond is None:
        raise ValueError(f"{who}: cond is required (cond_channels={cond_channels})")
    c = with_channels(cond, spatial_ndim, f"{who} cond").to(x.dtype)
    if c.shape[1] != cond_channels or c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"{who}: cond has shape {tuple(cond.shape)}, expected (B={x.shape[0]}, "
            f"{cond_channels}, {', '.join(map(str, x.shape[2:]))})"
        )
    return torch.cat([x, c], dim=1)


__all__ = ["FourierEmbedding", "TimeEmbedding", "expand_noise", "with_channels", "cat_cond"]
