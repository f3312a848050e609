"""Fourier neural operator backbone (Li et al. 2021), 1-D or 2-D, resolution-agnostic.

Each layer is ``h <- SiLU(K h + W h + emb(t))`` with ``K`` a spectral convolution that
multiplies the lowest ``modes`` Fourier coefficients by learned complex weights and
``W`` a pointwise linear map. FFTs use ``norm="forward"`` so Fourier coefficients are grid
averages: the same weights act on a function sampled at any resolution (with at least
``2 * modes`` points per axis; fewer points simply use fewer modes). The domain is
periodic and there are no coordinate channels, so the network is translation equivariant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.backbones.embedding import TimeEmbedding, cat_cond, expand_noise, with_channels


class SpectralConv(nn.Module):
    """Spectral convolution on ``(B, C, *spatial)`` with ``len(modes)`` in ``{1, 2}``."""

    def __init__(self, c_in: int, c_out: int, modes: tuple[int, ...]) -> None:
        super().__init__()
        if len(modes) not in (1, 2):
            raise ValueError(f"SpectralConv: modes must have 1 or 2 entries, got {modes}")
        self.modes = tuple(int(m) for m in modes)
        scale = 1.0 / math.sqrt(c_in * c_out)
        # 2-D keeps rows [:m0] and [-m0:] (positive and negative frequencies) x cols [:m1].
        shape = (c_in, c_out, *self.modes) if len(modes) == 1 else (2, c_in, c_out, *self.modes)
        # stored as real (..., 2) so that ``module.to(dtype)`` keeps the imaginary part
        self.weight = nn.Parameter(scale * torch.randn(*shape, 2) / math.sqrt(2.0))

    def forward(self, x: Tensor) -> Tensor:
        nd = len(self.modes)
        dims = tuple(range(-nd, 0))
        xf = torch.fft.rfftn(x, dim=dims, norm="forward")
        w = torch.view_as_complex(self.weight.to(x.dtype).contiguous())
        out = torch.zeros(
            x.shape[0], w.shape[-nd - 1], *xf.shape[2:], dtype=xf.dtype, device=x.device
        )
        if nd == 1:
            m = min(self.modes[0], xf.shape[-1])
            out[..., :m] = torch.einsum("bix,iox->box", xf[..., :m], w[..., :m])
        else:
            m0 = min(self.modes[0], x.shape[-2] // 2)
            m1 = min(self.modes[1], xf.shape[-1])
            out[..., :m0, :m1] = torch.einsum(
                "bixy,ioxy->boxy", xf[..., :m0, :m1], w[0, ..., :m0, :m1]
            )
            out[..., -m0:, :m1] = torch.einsum(
                "bixy,ioxy->boxy", xf[..., -m0:, :m1], w[1, ..., :m0, :m1]
            )
        return torch.fft.irfftn(out, s=x.shape[-nd:], dim=dims, norm="forward")


class FNO(nn.Module):
    """``F(x_in, c_noise, cond) -> out`` on a periodic 1-D or 2-D grid of any size.

    Args:
        channels: state channels ``C``; ``x_in`` is ``(B, *spatial)`` (``C = 1``) or
            ``(B, C, *spatial)``; the output has the shape of ``x_in``.
        cond_channels: context channels; ``cond`` is ``(B, Cc, *spatial)`` or ``(B, *spatial)``.
        modes: Fourier modes kept per axis; its length (1 or 2) sets the spatial dimension.
        width, depth: hidden channels and number of Fourier layers.
    """

    def __init__(
        self,
        channels: int = 1,
        cond_channels: int = 0,
        modes: tuple[int, ...] = (12, 12),
        width: int = 32,
        depth: int = 4,
        emb_dim: int = 64,
    ) -> None:
        super().__init__()
        self.channels, self.cond_channels = int(channels), int(cond_channels)
        self.nd = len(modes)
        conv = nn.Conv1d if self.nd == 1 else nn.Conv2d
        self.time = TimeEmbedding(emb_dim)
        self.lift = conv(channels + cond_channels, width, 1)
        self.spectral = nn.ModuleList(SpectralConv(width, width, modes) for _ in range(depth))
        self.pointwise = nn.ModuleList(conv(width, width, 1) for _ in range(depth))
        self.emb = nn.ModuleList(nn.Linear(emb_dim, width) for _ in range(depth))
        self.proj = nn.Sequential(
            conv(width, 2 * width, 1), nn.SiLU(), conv(2 * width, channels, 1)
        )
        self.act = nn.SiLU()

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        h = with_channels(x_in, self.nd, "FNO x_in")
        if h.shape[1] != self.channels:
            raise ValueError(f"FNO: x_in has {h.shape[1]} channels, expected {self.channels}")
        h = cat_cond(h, cond, self.cond_channels, self.nd, "FNO")
        e = self.time(expand_noise(c_noise, h.shape[0]).to(h.device))
        h = self.lift(h)
        tail = (None,) * self.nd
        for spec, pw, emb in zip(self.spectral, self.pointwise, self.emb, strict=True):
            h = self.act(spec(h) + pw(h) + emb(e)[(slice(None), slice(None), *tail)])
        return self.proj(h).reshape(x_in.shape)


__all__ = ["FNO", "SpectralConv"]
