"""Residual MLP backbone for flat states (Lorenz-63, small toy problems)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.backbones.embedding import TimeEmbedding, expand_noise


class _Block(nn.Module):
    def __init__(self, hidden: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.lin2(self.act(self.lin1(self.act(self.norm(h))) + self.emb(e)))


class MLP(nn.Module):
    """``F(x_in (B, *S), c_noise (B,), cond (B, *C) | None) -> (B, *S)``.

    The state and context are flattened and concatenated (``features = prod(S)``,
    ``cond_features = prod(C)``); ``depth`` residual blocks with the diffusion-time
    embedding added inside each block.
    """

    def __init__(
        self,
        features: int,
        cond_features: int = 0,
        hidden: int = 128,
        depth: int = 3,
        emb_dim: int = 64,
    ) -> None:
        super().__init__()
        self.features, self.cond_features = int(features), int(cond_features)
        self.time = TimeEmbedding(emb_dim)
        self.inp = nn.Linear(self.features + self.cond_features, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, self.features))

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        b = x_in.shape[0]
        h = x_in.reshape(b, -1)
        if h.shape[1] != self.features:
            raise ValueError(
                f"MLP: x_in has {h.shape[1]} features per sample, expected {self.features}"
            )
        if self.cond_features:
            if cond is None or cond.reshape(b, -1).shape[1] != self.cond_features:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(
                    f"MLP: cond must have {self.cond_features} features per sample, got {got}"
                )
            h = torch.cat([h, cond.reshape(b, -1).to(h.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("MLP: got cond but the backbone was built with cond_features=0")
        e = self.time(expand_noise(c_noise, b).to(h.device))
        h = self.inp(h)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(h).reshape(x_in.shape)


__all__ = ["MLP"]
