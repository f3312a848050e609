"""Device selection shared by every entry point (``--device``)."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a user string (``None``, ``"auto"``, ``"cpu"``, ``"cuda:1"``) into a device.

    Raises ``ValueError`` naming the argument when CUDA is requested but absent.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!s}: CUDA was requested but no CUDA device is available")
    return dev
