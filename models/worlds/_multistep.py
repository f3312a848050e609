"""Shared plumbing of the multi-frame worlds (DYffusion, Rolling): spec storage,
state normalisation, shape checks, multi-channel backbones and the forecast loop.

A world here is trained on windows ``(x_k, .., x_{k+H})`` cut by
:class:`models.train.WindowDataModule` with ``history = H`` (items are
``(x_{k..k+H-1}, x_{k+H})``); :meth:`SpecWorld.window` joins them back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def make_backbone(
    kind: str, state_shape: tuple[int, ...], channels: int, cond_channels: int, **kwargs: Any
) -> nn.Module:
    """``F(x_in (B, C, *S), c_noise (B,), cond (B, Cc, *S)) -> (B, C, *S)``.

    ``resnet1d`` (periodic ring), ``unet2d`` (2-D grid) or ``fno`` (1-D/2-D,
    resolution-agnostic); ``"auto"`` picks ``resnet1d`` in 1-D and ``fno`` in 2-D.
    """
    from models import backbones as bb

    nd = len(state_shape)
    if kind == "auto":
        kind = "resnet1d" if nd == 1 else "fno"
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if kind == "resnet1d" and nd == 1:
        return bb.ResNet1d(channels=channels, cond_channels=cond_channels, **kw)
    if kind == "unet2d" and nd == 2:
        return bb.UNet2d(channels=channels, cond_channels=cond_channels, **kw)
    if kind == "fno" and nd in (1, 2):
        kw.setdefault("modes", tuple(min(12, n // 2) for n in state_shape))
        return bb.FNO(channels=channels, cond_channels=cond_channels, **kw)
    raise ValueError(
        f"backbone {kind!r} does not fit a grid of shape {tuple(state_shape)} "
        "(resnet1d: 1-D, unet2d: 2-D, fno: 1-D or 2-D)"
    )


class SpecWorld(nn.Module):
    """Base: a frozen ``spec`` dataclass (``spec_cls``) with ``state_shape``, ``dt``,
    ``variable``, ``dims``; normalisation buffers ``state_mean``/``state_std`` (``S``)."""

    kind: ClassVar[str] = ""
    spec_cls: ClassVar[type] = object

    def __init__(self, spec: Any) -> None:
        super().__init__()
        self.spec = spec
        self.state_shape = tuple(spec.state_shape)
        self.variable, self.dims = spec.variable, tuple(spec.dims)
        self.register_buffer("state_mean", torch.zeros(self.state_shape))
        self.register_buffer("state_std", torch.ones(self.state_shape))
        self.meta: dict = {}

    # -- checkpoint
    def spec_dict(self) -> dict:
        d = dataclasses.asdict(self.spec)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_checkpoint(cls, payload: dict) -> SpecWorld:
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["spec"].items()}
        world = cls(cls.spec_cls(**spec))
        world.load_state_dict(payload["state_dict"])
        return world

    # -- training hooks (models.train): window length and construction from a TrainConfig
    window_key: ClassVar[str] = ""  # spec field whose value is the number of input frames
    config_fields: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields passed to the spec

    @classmethod
    def _window_frames(cls, config: Any) -> int:
        default = next(
            f.default for f in dataclasses.fields(cls.spec_cls) if f.name == cls.window_key
        )
        return int(config.world_kwargs.get(cls.window_key, default))

    @classmethod
    def prepare_config(cls, config: Any) -> Any:
        """The training config with ``history`` = this world's window (frames before the
        last one of each training window)."""
        return dataclasses.replace(config, history=cls._window_frames(config))

    @classmethod
    def from_config(cls, config: Any, dm: Any) -> SpecWorld:
        """A fresh world for the data of a set-up ``WindowDataModule`` and a ``TrainConfig``
        (``world_kwargs`` hold the kind-specific spec fields)."""
        kw = dict(config.world_kwargs)
        for name in cls.config_fields:
            value = getattr(config, name)
            if value not in (None, {}):
                kw.setdefault(name, value)
        try:
            spec = cls.spec_cls(
                state_shape=dm.state_shape,
                dt=dm.dt,
                backbone=config.backbone,
                backbone_kwargs=dict(config.backbone_kwargs),
                variable=dm.variable,
                dims=dm.grid_dims,
                **kw,
            )
        except TypeError as exc:
            raise ValueError(f"world_kwargs for world={cls.kind!r}: {exc}") from exc
        world = cls(spec)
        world.set_normalisation(dm.stats)
        return world

    def set_normalisation(self, stats: dict[str, Tensor]) -> None:
        """Copy ``state_mean``/``state_std`` (each broadcastable to ``S``)."""
        for name in ("state_mean", "state_std"):
            v = torch.as_tensor(stats[name], dtype=torch.float32)
            getattr(self, name).copy_(torch.broadcast_to(v, self.state_shape))

    # -- data
    def check(self, x: Tensor, lead: int = 1) -> Tensor:
        """``x`` ``(N, *S)`` on the world's device, else ``ValueError`` naming the grid."""
        s = self.state_shape
        if x.dim() != len(s) + lead or tuple(x.shape[lead:]) != s:
            raise ValueError(
                f"states of shape {tuple(x.shape)} do not match the world's grid: expected "
                f"(N, {', '.join(map(str, s))}) (grid {s}, dims {self.dims})"
            )
        if x.device != self.state_mean.device:
            raise ValueError(f"states are on {x.device}, the world on {self.state_mean.device}")
        return x.to(self.state_mean.dtype)

    def encode(self, x: Tensor) -> Tensor:
        return (x - self.state_mean) / self.state_std

    def decode(self, z: Tensor) -> Tensor:
        return self.state_mean + self.state_std * z

    @staticmethod
    def window(history: Tensor, nxt: Tensor) -> Tensor:
        """``(B, H, *S)`` and ``(B, *S)`` -> ``(B, H + 1, *S)``: ``x_k .. x_{k+H}``."""
        return torch.cat([history, nxt.unsqueeze(1).to(history.dtype)], 1)

    def data_dim(self) -> int:
        return math.prod(self.state_shape)

    # -- protocol
    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One physical step ``(N, *S) -> (N, *S)``: runs :meth:`transition_sampler`."""
        with torch.no_grad():
            return self.transition_sampler(x).run(generator)

    @torch.no_grad()
    def forecast(
        self,
        x0: Tensor,
        n_steps: int,
        members: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ensemble ``(members, n_steps, *S)`` of repeated :meth:`step` from ``x0``
        ``(*S)`` (replicated) or ``(members, *S)``, in the world's dtype."""
        from models.worlds.base import rollout

        return rollout(self, x0.to(self.state_mean.dtype), n_steps, members, generator)

    def transition_sampler(self, cond: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError
