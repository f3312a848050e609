"""Random draws with an explicit ``torch.Generator`` on any device.

A generator lives on one device; these helpers draw on the generator's device and
move the result to the requested one, so a CPU generator can drive a CUDA run
(reproducible across devices) and no global RNG state is touched.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _where(generator: torch.Generator | None, device) -> torch.device | None:
    return generator.device if generator is not None else device


def randn(shape, generator=None, *, device=None, dtype=None) -> Tensor:
    """Standard normal draws of ``shape`` on ``device``."""
    out = torch.randn(
        tuple(shape), generator=generator, device=_where(generator, device), dtype=dtype
    )
    return out.to(device) if device is not None else out


def rand(shape, generator=None, *, device=None, dtype=None) -> Tensor:
    """Uniform ``[0, 1)`` draws of ``shape`` on ``device``."""
    out = torch.rand(
        tuple(shape), generator=generator, device=_where(generator, device), dtype=dtype
    )
    return out.to(device) if device is not None else out
