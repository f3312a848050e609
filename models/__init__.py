"""Generative and physical dynamics: diffusion, backbones, simulators, world models.

``models`` never imports ``assim``; a user who only wants a forecasting model
imports this package alone.
"""

from models.device import default_device, resolve_device

__all__ = ["default_device", "resolve_device", "load"]


def load(path, device=None):
    """Load a world model from a checkpoint written by ``models.train`` (lazy import)."""
    from models.checkpoint import load as _load

    return _load(path, device=device)
