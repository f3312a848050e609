"""Backbones ``F(x_in, c_noise, cond) -> out`` for :class:`models.diffusion.Denoiser`.

``x_in`` is ``(B, *S)``, ``c_noise`` ``(B,)`` (``log(sigma / alpha) / 4``, embedded with
Fourier features), ``cond`` optional context channels. Defaults are small (CPU-friendly).

- :class:`MLP` (flat states), :class:`ResNet1d` (periodic rings, e.g. Lorenz-96),
  :class:`UNet2d` (gridded fields, circular padding, odd sizes, land mask),
  :class:`FNO` (1-D/2-D, resolution-agnostic).
"""

from models.backbones.embedding import FourierEmbedding, TimeEmbedding
from models.backbones.fno import FNO
from models.backbones.mlp import MLP
from models.backbones.resnet1d import ResNet1d
from models.backbones.unet2d import UNet2d

__all__ = ["FourierEmbedding", "TimeEmbedding", "MLP", "ResNet1d", "UNet2d", "FNO"]
