"""Build diffusion components from the plain names stored in world checkpoints.

A checkpoint records ``backbone``/``schedule``/``sampler`` as short names plus
keyword arguments, so a world is rebuilt without pickling classes.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from models.diffusion import samplers as _samplers
from models.diffusion import schedules as _schedules

SCHEDULES = {"edm": _schedules.EDM, "cosine": _schedules.CosineVP, "linear": _schedules.LinearVP}
SAMPLERS = {**_samplers.SAMPLERS, "em": _samplers.EulerMaruyama}


def build_schedule(kind: str, **kwargs: Any) -> _schedules.Schedule:
    """``"edm"`` (VE, Karras et al. 2022), ``"cosine"`` or ``"linear"`` (VP)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**kwargs)


def build_sampler(kind: str, denoiser: nn.Module, eta: float = 1.0) -> _samplers.Sampler:
    """Sampler by name; ``eta`` is used by ``"ddim"`` only."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; known: {sorted(SAMPLERS)}")
    if kind == "ddim":
        return _samplers.DDIM(denoiser, eta=eta)
    return SAMPLERS[kind](denoiser)


def resolve_backbone(kind: str, state_shape: tuple[int, ...]) -> str:
    """``"auto"``: ``resnet1d`` for a 1-D ring of >= 8 points, ``unet2d`` for a 2-D grid,
    else ``mlp``; other names pass through."""
    if kind != "auto":
        return kind
    if len(state_shape) == 1 and state_shape[0] >= 8:
        return "resnet1d"
    return "unet2d" if len(state_shape) == 2 else "mlp"


def build_backbone(
    kind: str, state_shape: tuple[int, ...], history: int, **kwargs: Any
) -> nn.Module:
    """Backbone ``F(x_in (B, *S), c_noise (B,), cond (B, h, *S)) -> (B, *S)`` by name.

    ``resnet1d`` (periodic ring, ``S = (n,)``), ``unet2d`` (``S = (H, W)``), ``fno``
    (1-D or 2-D, resolution-agnostic) take the ``h`` history frames as context channels;
    ``mlp`` flattens everything. ``kwargs`` go to the backbone (lists become tuples).
    """
    from models import backbones as bb

    kind = resolve_backbone(kind, state_shape)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    nd = len(state_shape)
    need = {"resnet1d": (1,), "unet2d": (2,), "fno": (1, 2)}
    if kind in need and nd not in need[kind]:
        raise ValueError(
            f"backbone {kind!r} needs a {' or '.join(map(str, need[kind]))}-D grid, "
            f"got state shape {tuple(state_shape)}"
        )
    if kind == "resnet1d":
        return bb.ResNet1d(channels=1, cond_channels=history, **kw)
    if kind == "unet2d":
        return bb.UNet2d(channels=1, cond_channels=history, **kw)
    if kind == "fno":
        kw.setdefault("modes", tuple(min(12, n // 2) for n in state_shape))
        return bb.FNO(channels=1, cond_channels=history, **kw)
    if kind == "mlp":
        d = math.prod(state_shape)
        return bb.MLP(features=d, cond_features=history * d, **kw)
    raise ValueError(f"unknown backbone {kind!r}; known: auto, fno, mlp, resnet1d, unet2d")
