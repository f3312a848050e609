"""World-model checkpoints: one torch file that rebuilds a ready world, no Lightning needed.

Format (a ``dict`` written with :func:`torch.save`, read with ``weights_only=True``)::

    {"format": "assim-world", "version": 1,
     "kind": "conditional",           # key of WORLD_KINDS
     "spec": {...},                   # plain data: backbone/schedule kinds + kwargs, grid
                                      # shape, dt, variable name, dims, sampler defaults
     "state_dict": {...},             # weights + normalisation buffers
     "meta": {...}}                   # how it was trained (free-form, plain data)

``load("physical:l96")`` also returns the true-model world of a simulator, so
every entry point that takes ``--world CKPT`` accepts the physical baseline too;
``load("l96")`` / ``load("l63")`` (no such file in the working directory) load the
small pretrained checkpoints shipped in ``models/checkpoints/`` (package data; made
by ``experiments/train_checkpoints.py``).
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "assim-world"
VERSION = 1

# kind -> "module:Class"; each class has ``from_checkpoint(payload) -> world`` (an nn.Module).
WORLD_KINDS: dict[str, str] = {
    "conditional": "models.worlds.conditional:Conditional",
    "dyffusion": "models.worlds.dyffusion:DYffusion",
    "rolling": "models.worlds.rolling:Rolling",
    "function_space": "models.worlds.function_space:FunctionSpace",
}


def shipped() -> dict[str, Path]:
    """The pretrained checkpoints shipped with the package: ``{name: path}``."""
    folder = importlib.resources.files("models") / "checkpoints"
    if not folder.is_dir():
        return {}
    return {
        Path(f.name).stem: Path(str(f))
        for f in folder.iterdir()
        if f.name.endswith((".pt", ".ckpt"))
    }


def _world_class(kind: str) -> Any:
    if kind not in WORLD_KINDS:
        raise ValueError(f"unknown world kind {kind!r}; known kinds: {sorted(WORLD_KINDS)}")
    module, name = WORLD_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def save(world: torch.nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``world`` (which provides ``kind`` and ``spec_dict()``) atomically to ``path``."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": world.kind,
        "spec": world.spec_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in world.state_dict().items()},
        "meta": json.loads(json.dumps(meta or {}, default=str)),  # plain data only
    }
    return save_atomic(payload, path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, then ``os.replace``: the
    destination is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint payload (on CPU). Raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"world checkpoint {str(path)!r} does not exist (shipped names: "
            f"{sorted(shipped())}; or physical:l63|l96|kolmogorov)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{str(path)!r} is not a readable world checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not an assim world checkpoint (expected format {FORMAT!r}); "
            "Lightning training checkpoints are for resuming, use the file written by train_world"
        )
    if payload.get("version", 0) > VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint version {payload['version']}, newer than "
            f"this package reads ({VERSION})"
        )
    return payload


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Rebuild a ready world model (eval mode) on ``device`` from a checkpoint.

    ``path`` may also be ``"physical:<name>"`` (e.g. ``physical:l96``) for the
    true-model world of a simulator (``models.worlds.physical.physical_world``).
    """
    from models.device import resolve_device

    dev = resolve_device(device)
    if isinstance(path, str) and path.startswith("physical:"):
        from models.worlds.physical import physical_world

        world = physical_world(path.split(":", 1)[1])
        return world.to(dev) if hasattr(world, "to") else world
    if isinstance(path, str) and not Path(path).exists() and path in shipped():
        path = shipped()[path]
    payload = read(path)
    world = _world_class(payload["kind"]).from_checkpoint(payload)
    world.meta = payload.get("meta", {})
    return world.to(dev).eval()
