"""Shipped Lorenz-96 world checkpoints (``models/checkpoints/l96*.pt``).

Shipped worlds: each loads by name, carries no machine path in its ``meta``, and its
one-step forecast beats persistence on a held-out Lorenz-96 trajectory (seed 5; the
training data used seed 96).
"""

from __future__ import annotations

import pytest
import torch

import models
from models.worlds.dyffusion import DYffusionDataStep
from models.worlds.physical import physical_world

SHIPPED = ("l96", "l96_dyffusion", "l96_rolling", "l96_function_space")


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _truth(n_ic: int, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_ic`` states 1 MTU apart on an attractor trajectory and the states ``lead`` data
    steps later, ``(n_ic, 40)`` each."""
    phys = physical_world("l96")
    g = torch.Generator().manual_seed(5)
    x = 8.0 + torch.randn(1, 40, generator=g, dtype=torch.float64)
    for _ in range(400):  # spin-up, 20 MTU
        x = phys.step(x)
    ics, ends = [], []
    for _ in range(n_ic):
        for _ in range(20):
            x = phys.step(x)
        ics.append(x[0])
        y = x
        for _ in range(lead):
            y = phys.step(y)
        ends.append(y[0])
    return torch.stack(ics).float(), torch.stack(ends).float()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_world_loads_without_machine_paths(name):
    world = models.load(name, device="cpu")
    assert world.kind == (name.split("_", 1)[1] if "_" in name else "conditional")
    assert tuple(world.state_shape) == (40,)
    bad = [s for s in _strings(world.meta) if s.startswith(("/", "~")) or ":\\" in s]
    assert not bad, f"{name}: machine paths in meta: {bad}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_world_one_step_beats_persistence(name):
    """One world step (0.05 MTU; DYffusion 4 data steps = 0.2 MTU) from 16 attractor
    states. A trained world's one-step RMSE is ~0.005-0.14 (README), persistence's ~0.9
    (0.05 MTU) / ~3.3 (0.2 MTU); an untrained or mis-normalised network gives errors of
    persistence size or more, so a 0.25x margin separates the two with room for
    sampling noise (16 x 40 values: the RMSE's relative MC error is ~4 %)."""
    world = models.load(name, device="cpu")
    lead = getattr(world, "horizon", 1)
    x0, x1 = _truth(16, lead)
    pred = world.step(x0, torch.Generator().manual_seed(0))
    rmse = float(((pred - x1) ** 2).mean().sqrt())
    pers = float(((x0 - x1) ** 2).mean().sqrt())
    assert rmse < 0.25 * pers, f"{name}: one-step RMSE {rmse:.3f} vs persistence {pers:.3f}"


def test_dyffusion_data_step_of_shipped_world_beats_persistence():
    world = DYffusionDataStep(models.load("l96_dyffusion", device="cpu"))
    assert world.dt == pytest.approx(0.05)
    x0, x1 = _truth(16, 1)
    pred = world.step(x0, torch.Generator().manual_seed(0))
    rmse = float(((pred - x1) ** 2).mean().sqrt())
    pers = float(((x0 - x1) ** 2).mean().sqrt())
    assert rmse < 0.25 * pers, f"one-data-step RMSE {rmse:.3f} vs persistence {pers:.3f}"
