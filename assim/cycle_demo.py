"""Synthetic observation inboxes and the three-cycle Lorenz-96 demo.

:func:`write_observation_file` writes an observation file in the format that
:func:`assim.cycle_files.read_observations` expects (variable ``(time, obs)`` with
units and a CF time axis), atomically. :func:`synthetic_inbox` fills an inbox from
a truth run of the configured world; :func:`run_demo_cycles` is what ``assim demo``
calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from assim.cycle_config import CycleConfig, config_from_dict, parse_cycle_time
from assim.io import write_dataset

__all__ = ["demo_config", "run_demo_cycles", "synthetic_inbox", "write_observation_file"]


def write_observation_file(
    path: Path, times: Sequence[datetime], values: np.ndarray, variable: str, units: str
) -> Path:
    """Write ``values`` ``(T, m)`` at ``times`` as ``variable(time, obs)`` (CF) with
    :func:`assim.io.write_dataset` (atomic), so that a cycle never reads a half file."""
    values = np.asarray(values, dtype=np.float64)
    ds = xr.Dataset(
        {variable: (("time", "obs"), values, {"units": units, "long_name": "observations"})},
        coords={
            "time": ("time", np.array(times, dtype="datetime64[ns]"), {"standard_name": "time"}),
            "obs": ("obs", np.arange(values.shape[1], dtype=np.int32)),
        },
    )
    ds["time"].encoding.update(units="hours since 1970-01-01", dtype="float64")
    return write_dataset(ds, path)


def synthetic_inbox(
    cfg: CycleConfig,
    times: Sequence[datetime],
    world: Any,
    observation: Any,
    x0: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """Run a truth ``x_{k+1} = world.step(x_k)`` from ``x0`` ``(*S)`` at the start of the
    window of ``times[0]`` and write ``y_k = h(x_k) + noise`` for every step of every
    cycle in ``times`` (consecutive) into the config's inbox. Returns the truth at
    the cycle times ``(len(times), *S)``."""
    gen = torch.Generator().manual_seed(seed)
    x, truth = x0.unsqueeze(0), []
    spec = cfg.observations
    for t in times:
        steps, ys = [], []
        for k in range(1, cfg.steps_per_cycle + 1):
            x = world.step(x, generator=gen)
            steps.append(t - cfg.interval + k * cfg.step)
            ys.append(observation.sample(x, generator=gen)[0])
        truth.append(x[0])
        write_observation_file(
            spec.path(t), steps, torch.stack(ys).cpu().numpy(), spec.variable, spec.units
        )
    return torch.stack(truth)


def demo_config(out_dir: str | os.PathLike, **overrides: Any) -> CycleConfig:
    """The L96 demo cycle: 40 variables, ETKF with 40 members, 4 steps (0.05 MTU,
    "6 h") per daily cycle, all variables observed with sigma 1, 2-day forecast."""
    out_dir = Path(out_dir)
    data: dict[str, Any] = {
        "start": "2026-11-24T00",
        "interval_hours": 24,
        "steps_per_cycle": 4,
        "forecast_hours": 48,
        "members": 40,
        "seed": 2026,
        "retention": 10,
        "output": "cycles",
        "world": {"source": "physical:l96", "options": {"n": 40}},
        "method": {"name": "etkf", "options": {"inflation": 1.02}},
        "observations": {
            "inbox": "inbox",
            "pattern": "obs_{cycle:%Y%m%dT%H}.nc",
            "variable": "x",
            "units": "1",
            "operator": "identity",
            "sigma": 1.0,
        },
        "cold_start": {"mean": 8.0, "std": 1.0, "spinup_steps": 100},
    }
    data.update(overrides)
    return config_from_dict(data, out_dir)


def run_demo_cycles(out_dir: str | os.PathLike) -> list[Path]:
    """Three consecutive L96 cycles with synthetic observations generated into
    ``out_dir/inbox``; returns the three cycle folders (each with analysis.nc,
    forecast.nc, restart.nc, quicklook.png and record.json)."""
    from assim.cycle import build_components, catch_up
    from assim.cycle_config import cycle_name

    cfg = demo_config(out_dir)
    times = cfg.cycle_times(cfg.start, parse_cycle_time("2026-11-26T00"))
    comp = build_components(cfg)
    gen = torch.Generator().manual_seed(7)
    x0 = 8.0 + torch.randn(comp.world.state_shape, generator=gen, dtype=comp.dtype)
    for _ in range(200):  # spin the truth up onto the attractor
        x0 = comp.world.step(x0.unsqueeze(0))[0]
    synthetic_inbox(cfg, times, comp.world, comp.observation, x0, seed=11)
    catch_up(cfg, times[-1], comp)
    return [cfg.output / cycle_name(t) for t in times]
