"""Periodic 1-D ResNet backbone for rings (Lorenz-96).

All convolutions use circular padding and every other operation is pointwise in space or
a statistic over the whole ring (GroupNorm), so the network is exactly equivariant to
circular shifts: ``F(roll(x, k)) = roll(F(x), k)`` for every ``k``.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.backbones.embedding import TimeEmbedding, cat_cond, expand_noise, with_channels


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


class ResBlock1d(nn.Module):
    """``GroupNorm -> SiLU -> conv -> +emb -> GroupNorm -> SiLU -> conv`` plus a skip."""

    def __init__(self, width: int, emb_dim: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size // 2)
        conv = dict(padding=pad, dilation=dilation, padding_mode="circular")
        self.norm1 = nn.GroupNorm(_groups(width), width)
        self.conv1 = nn.Conv1d(width, width, kernel_size, **conv)
        self.emb = nn.Linear(emb_dim, width)
        self.norm2 = nn.GroupNorm(_groups(width), width)
        self.conv2 = nn.Conv1d(width, width, kernel_size, **conv)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        z = self.conv1(self.act(self.norm1(h))) + self.emb(e)[:, :, None]
        return h + self.conv2(self.act(self.norm2(z)))


class ResNet1d(nn.Module):
    """``F(x_in, c_noise, cond) -> out`` on a periodic 1-D grid of any length ``n``.

    Args:
        channels: state channels ``C``; ``x_in`` is ``(B, n)`` (needs ``C = 1``) or
            ``(B, C, n)``; the output has the shape of ``x_in``.
        cond_channels: context channels ``Cc``; ``cond`` is ``(B, Cc, n)`` or ``(B, n)``.
        width, depth, kernel_size: hidden channels, residual blocks, odd kernel size.
        dilations: per-block dilation cycle (receptive field grows with it).
    """

    def __init__(
        self,
        channels: int = 1,
        cond_channels: int = 0,
        width: int = 64,
        depth: int = 4,
        kernel_size: int = 5,
        emb_dim: int = 64,
        dilations: tuple[int, ...] = (1, 2),
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ResNet1d: kernel_size must be odd, got {kernel_size}")
        self.channels, self.cond_channels = int(channels), int(cond_channels)
        self.time = TimeEmbedding(emb_dim)
        k = kernel_size
        self.inp = nn.Conv1d(
            channels + cond_channels, width, k, padding=k // 2, padding_mode="circular"
        )
        self.blocks = nn.ModuleList(
            ResBlock1d(width, emb_dim, k, dilations[i % len(dilations)]) for i in range(depth)
        )
        self.out = nn.Sequential(
            nn.GroupNorm(_groups(width), width),
            nn.SiLU(),
            nn.Conv1d(width, channels, k, padding=k // 2, padding_mode="circular"),
        )

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        h = with_channels(x_in, 1, "ResNet1d x_in")
        if h.shape[1] != self.channels:
            raise ValueError(f"ResNet1d: x_in has {h.shape[1]} channels, expected {self.channels}")
        h = cat_cond(h, cond, self.cond_channels, 1, "ResNet1d")
        e = self.time(expand_noise(c_noise, h.shape[0]).to(h.device))
        h = self.inp(h)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(h).reshape(x_in.shape)


__all__ = ["ResNet1d", "ResBlock1d"]
