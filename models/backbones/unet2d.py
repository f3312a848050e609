"""2-D U-Net with periodic (circular) padding for gridded fields.

Convolutions pad each axis circularly when it is periodic (``periodic=(lat, lon)``) and
replicate the edge otherwise. Down-sampling is a 2x2 box blur followed by *adaptive
polyphase sampling* (Chaman & Dapello 2021, "Truly shift-invariant CNNs"): of the four
2x2 polyphase components the one with the largest norm is kept and its phase is reused
when up-sampling, so on periodic axes the whole network is exactly equivariant to every
circular shift ``torch.roll(x, k)`` (not only to multiples of the stride).

Odd or non-divisible sizes are padded up to a multiple of ``2^(levels - 1)`` (circular
wrap on periodic axes, edge replication otherwise) and the output is cropped back;
exact shift equivariance then holds only for divisible sizes. An optional land/sea
``mask`` ``(H, W)`` is appended as an input channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones.embedding import TimeEmbedding, cat_cond, expand_noise, with_channels


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


def pad2d(x: Tensor, before: tuple[int, int], after: tuple[int, int], periodic) -> Tensor:
    """Pad ``(B, C, H, W)`` by ``before/after`` rows and columns, per-axis circular/replicate."""
    if before[1] or after[1]:
        x = F.pad(x, (before[1], after[1], 0, 0), mode="circular" if periodic[1] else "replicate")
    if before[0] or after[0]:
        x = F.pad(x, (0, 0, before[0], after[0]), mode="circular" if periodic[0] else "replicate")
    return x


class PadConv2d(nn.Module):
    """``Conv2d`` (odd kernel) with per-axis circular or replicate "same" padding."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, periodic=(True, True)):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size)
        self.p, self.periodic = kernel_size // 2, tuple(periodic)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(pad2d(x, (self.p, self.p), (self.p, self.p), self.periodic))


class ResBlock2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, periodic) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = PadConv2d(c_in, c_out, 3, periodic)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = PadConv2d(c_out, c_out, 3, periodic)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        z = self.conv1(self.act(self.norm1(h))) + self.emb(e)[:, :, None, None]
        return self.skip(h) + self.conv2(self.act(self.norm2(z)))


def aps_down(h: Tensor, periodic) -> tuple[Tensor, Tensor]:
    """Blur 2x2 then keep the max-norm polyphase component; returns ``(h, phase (B, 2))``."""
    h = F.avg_pool2d(pad2d(h, (0, 0), (1, 1), periodic), 2, stride=1)
    cands = [
        (a, b) for a in ((0, 1) if periodic[0] else (0,)) for b in ((0, 1) if periodic[1] else (0,))
    ]
    comps = torch.stack([h[:, :, a::2, b::2] for a, b in cands], dim=1)  # (B, P, C, h, w)
    idx = comps.flatten(2).square().sum(2).argmax(1)
    phase = torch.tensor(cands, device=h.device)[idx]
    return comps[torch.arange(h.shape[0], device=h.device), idx], phase


def aps_up(h: Tensor, phase: Tensor) -> Tensor:
    """Nearest 2x up-sampling placed back at each sample's polyphase ``phase``."""
    up = h.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    out = up.clone()
    for p in torch.unique(phase, dim=0):
        sel = (phase == p).all(1)
        out[sel] = torch.roll(up[sel], shifts=(int(p[0]), int(p[1])), dims=(-2, -1))
    return out


class UNet2d(nn.Module):
    """``F(x_in, c_noise, cond) -> out`` on a ``(H, W)`` grid.

    Args:
        channels: state channels ``C``; ``x_in`` is ``(B, H, W)`` (``C = 1``) or
            ``(B, C, H, W)``; the output has the shape of ``x_in``.
        cond_channels: context channels; ``cond`` is ``(B, Cc, H, W)`` or ``(B, H, W)``.
        width, mults: channels ``width * m`` at each of ``len(mults)`` resolution levels.
        periodic: ``(rows, cols)`` periodicity (e.g. ``(False, True)`` for lat-lon).
        mask: optional ``(H, W)`` land/sea mask, appended as an input channel.
    """

    def __init__(
        self,
        channels: int = 1,
        cond_channels: int = 0,
        width: int = 32,
        mults: tuple[int, ...] = (1, 2),
        emb_dim: int = 64,
        periodic: tuple[bool, bool] = (True, True),
        mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.channels, self.cond_channels = int(channels), int(cond_channels)
        self.periodic = tuple(bool(p) for p in periodic)
        self.register_buffer("mask", None if mask is None else mask.float().clone())
        extra = 0 if mask is None else 1
        ch = [width * m for m in mults]
        self.levels = len(ch)
        self.time = TimeEmbedding(emb_dim)
        self.inp = PadConv2d(channels + cond_channels + extra, ch[0], 3, self.periodic)
        self.down = nn.ModuleList(
            ResBlock2d(ch[max(i - 1, 0)], ch[i], emb_dim, self.periodic) for i in range(len(ch))
        )
        self.mid = ResBlock2d(ch[-1], ch[-1], emb_dim, self.periodic)
        self.up = nn.ModuleList(
            ResBlock2d(ch[min(i + 1, len(ch) - 1)] + ch[i], ch[i], emb_dim, self.periodic)
            for i in range(len(ch))
        )
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(ch[0]), ch[0]),
            nn.SiLU(),
            PadConv2d(ch[0], channels, 3, self.periodic),
        )

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        h = with_channels(x_in, 2, "UNet2d x_in")
        if h.shape[1] != self.channels:
            raise ValueError(f"UNet2d: x_in has {h.shape[1]} channels, expected {self.channels}")
        h = cat_cond(h, cond, self.cond_channels, 2, "UNet2d")
        size = tuple(h.shape[-2:])
        if self.mask is not None:
            if tuple(self.mask.shape) != size:
                raise ValueError(f"UNet2d: mask has shape {tuple(self.mask.shape)}, grid is {size}")
            h = torch.cat([h, self.mask.to(h.dtype).expand(h.shape[0], 1, *size)], dim=1)
        f = 2 ** (self.levels - 1)
        h = pad2d(h, (0, 0), ((-size[0]) % f, (-size[1]) % f), self.periodic)
        e = self.time(expand_noise(c_noise, h.shape[0]).to(h.device))
        h = self.inp(h)
        skips, phases = [], []
        for i, blk in enumerate(self.down):
            h = blk(h, e)
            skips.append(h)
            if i < self.levels - 1:
                h, ph = aps_down(h, self.periodic)
                phases.append(ph)
        h = self.mid(h, e)
        for i in reversed(range(self.levels)):
            if i < self.levels - 1:
                h = aps_up(h, phases[i])
            h = self.up[i](torch.cat([h, skips[i]], dim=1), e)
        out = self.out(h)[..., : size[0], : size[1]]
        return out.reshape(x_in.shape)


__all__ = ["UNet2d", "PadConv2d", "pad2d"]
