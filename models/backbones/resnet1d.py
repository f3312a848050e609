"""Periodic 1-D ResNet backbone for rings (Lorenz-96).

All convolutions use circular padding and every other operation is pointwise in space or
a statistic over the whole ring (GroupNorm), so the network is exactly equivariant to
circular shifts: ``F(roll(x, k)) = roll(F(x), k)`` for every ``k``.

Fast path. The modules are the plain ``nn.Conv1d(padding_mode="circular")`` /
``nn.GroupNorm`` layers the checkpoints hold (state-dict keys unchanged), but
:meth:`ResNet1d.forward` evaluates them in a leaner way that computes the same function
(:meth:`ResNet1d.forward_reference` is the plain module path):

* activations are kept as ``(B, C, 1, n)`` tensors in ``channels_last`` memory (position
  major, channels contiguous), for which oneDNN's convolution is ~25 % faster on CPU than
  for ``(B, C, n)``; each ``k``-tap convolution is ``F.conv2d`` with a ``(1, k)`` kernel;
* the periodic halo is built once per convolution into a fresh buffer, with the SiLU
  written straight into its interior when no gradient is needed (:func:`silu_halo`), so
  neither ``F.pad(mode="circular")`` nor a separate padding copy runs;
* the skip and time-embedding additions are done in place on fresh convolution outputs;
* the output convolution (``width -> channels``, few output channels) is one matrix
  product over the taps, ``G[l, (o, j)] = sum_c xp[l, c] W[o, c, j]``, then the shifted sum
  ``out[o, l] = b_o + sum_j G[l + j d, (o, j)]`` (:func:`taps_conv`): oneDNN is ~6x slower
  for a single output channel.

The convolutions and the GroupNorm sum in a different order than on the module path, so
the two agree to float32 rounding (~3e-7 relative on the shipped ``l96.pt``), not
bit-for-bit; ``tests/models/test_backbone_speed_equiv.py`` checks this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones.embedding import TimeEmbedding, cat_cond, expand_noise, with_channels

_CL = torch.channels_last


def _groups(width: int) -> int:
    return next(g for g in (8, 4, 2, 1) if width % g == 0)


def to_rows(x: Tensor) -> Tensor:
    """``(B, C, n)`` -> ``(B, C, 1, n)`` in ``channels_last`` memory (a copy)."""
    return x.unsqueeze(2).contiguous(memory_format=_CL)


def silu_halo(x: Tensor, p: int, act: bool = True) -> Tensor:
    """``silu(x)`` (or ``x`` when ``act`` is false) with a periodic halo of ``p`` points:
    ``(B, C, 1, n) -> (B, C, 1, n + 2p)`` in ``channels_last`` memory.

    Equal to ``F.pad(silu(x), (p, p), mode="circular")``: the interior is written by the
    SiLU itself (``out=``, when no gradient is needed) and the halo is copied from it.
    """
    n = x.shape[-1]
    if p > n:
        raise ValueError(f"ResNet1d: circular padding {p} exceeds the grid length {n}")
    out = torch.empty((*x.shape[:-1], n + 2 * p), dtype=x.dtype, device=x.device, memory_format=_CL)
    mid = out[..., p : p + n]
    if act and not (torch.is_grad_enabled() and x.requires_grad):
        torch.ops.aten.silu.out(x, out=mid)
    else:
        mid.copy_(F.silu(x) if act else x)
    out[..., :p] = out[..., n : n + p]
    out[..., p + n :] = out[..., p : 2 * p]
    return out


def rows_weight(conv: nn.Conv1d) -> Tensor:
    """``conv.weight (O, C, k)`` as ``(O, C, 1, k)`` in ``channels_last`` memory.

    Unless autograd needs the weight's gradient, the copy is memoised on the module (not
    in its state dict), keyed by the weight's identity, storage and version counter, so an
    in-place update (optimizer step, ``load_state_dict``) or a move to another device or
    dtype makes a fresh copy.
    """
    w = conv.weight
    if (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():
        return w.unsqueeze(2).contiguous(memory_format=_CL)
    key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape)
    memo = conv.__dict__.get("_rows_weight")
    if memo is None or memo[0] is not w or memo[1] != key:
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor: usable
            # later where autograd records (gradients w.r.t. the input of a frozen net)
            memo = (w, key, w.detach().unsqueeze(2).contiguous(memory_format=_CL))
        conv.__dict__["_rows_weight"] = memo
    return memo[2]


def rows_conv(conv: nn.Conv1d, xp: Tensor) -> Tensor:
    """The unpadded convolution of ``conv`` on a haloed ``xp (B, C, 1, n + 2p)``:
    ``(B, O, 1, n)`` in ``channels_last`` memory."""
    return F.conv2d(xp, rows_weight(conv), conv.bias, 1, 0, (1, conv.dilation[0]), conv.groups)


def taps_conv(conv: nn.Conv1d, xp: Tensor) -> Tensor:
    """The unpadded convolution of ``conv`` (groups 1) on a haloed ``xp (B, C, 1, n + 2p)``
    as one matrix product over the taps (fast for few output channels): ``(B, O, n)``.

    ``G[b, l, (o, j)] = sum_c xp[b, c, l] W[o, c, j]``, then
    ``out[b, o, l] = b_o + sum_j G[b, l + j d, (o, j)]`` with dilation ``d``.
    """
    o, c, k = conv.weight.shape
    d = conv.dilation[0]
    n = xp.shape[-1] - d * (k - 1)
    rows = xp.permute(0, 2, 3, 1).reshape(xp.shape[0], -1, c)  # (B, n + 2p, C), a view
    g = (rows @ conv.weight.permute(1, 0, 2).reshape(c, o * k)).view(xp.shape[0], -1, o, k)
    out = g[:, :n, :, 0]
    out = out + conv.bias if conv.bias is not None else out.clone()
    for j in range(1, k):
        out = out + g[:, j * d : j * d + n, :, j]
    return out.transpose(1, 2)


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
        """``h (B, width, n)`` or ``(B, width, 1, n)`` (fast layout), ``e (B, emb_dim)``
        -> the same shape as ``h``."""
        if h.ndim == 3:
            return self.forward(to_rows(h), e)[:, :, 0, :]
        p = self.conv1.padding[0]
        z = rows_conv(self.conv1, silu_halo(self.norm1(h), p))
        z = z.add_(self.emb(e)[:, :, None, None])  # fresh conv output: in place is safe
        return rows_conv(self.conv2, silu_halo(self.norm2(z), p)).add_(h)

    def forward_reference(self, h: Tensor, e: Tensor) -> Tensor:
        """The plain module path on ``h (B, width, n)`` (what :meth:`forward` computes)."""
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

    def _inputs(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(h (B, C + Cc, n), e (B, emb_dim))``: state and context channels, embedding."""
        h = with_channels(x_in, 1, "ResNet1d x_in")
        if h.shape[1] != self.channels:
            raise ValueError(f"ResNet1d: x_in has {h.shape[1]} channels, expected {self.channels}")
        h = cat_cond(h, cond, self.cond_channels, 1, "ResNet1d")
        return h, self.time(expand_noise(c_noise, h.shape[0]).to(h.device))

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x_in (B, n)`` or ``(B, C, n)``, ``c_noise`` scalar or ``(B,)`` -> like ``x_in``
        (the fast path; see the module docstring)."""
        h, e = self._inputs(x_in, c_noise, cond)
        h = rows_conv(self.inp, silu_halo(to_rows(h), self.inp.padding[0], act=False))
        for blk in self.blocks:
            h = blk(h, e)
        norm, _, conv = self.out
        out = taps_conv(conv, silu_halo(norm(h), conv.padding[0]))
        return out.reshape(x_in.shape)

    def forward_reference(
        self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None
    ) -> Tensor:
        """The plain module path (``nn.Conv1d`` circular padding, ``(B, C, n)`` layout): the
        function :meth:`forward` computes, kept as the reference of the equivalence test."""
        h, e = self._inputs(x_in, c_noise, cond)
        h = self.inp(h)
        for blk in self.blocks:
            h = blk.forward_reference(h, e)
        return self.out(h).reshape(x_in.shape)


__all__ = [
    "ResNet1d",
    "ResBlock1d",
    "rows_conv",
    "rows_weight",
    "silu_halo",
    "taps_conv",
    "to_rows",
]
