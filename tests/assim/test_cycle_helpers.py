"""Shared helpers of the nightly-cycle tests (no tests here).

The standard test cycle is tiny: Lorenz-96 with 40 variables and model noise, the
stochastic EnKF with 10 members, 2 world steps per daily cycle (observations at
both), a 2-step forecast, no PNG (some tests turn it on), so that 30 cycles run in a
few seconds. World noise and perturbed observations make every output depend on
the per-cycle seed, so byte-identity checks test the seeding too.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from assim.cycle import build_components
from assim.cycle_config import CycleConfig, load_config
from assim.cycle_demo import synthetic_inbox

T0 = datetime(2026, 11, 1, 0)


def base_config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "start": "2026-11-01T00",
        "interval_hours": 24,
        "steps_per_cycle": 2,
        "forecast_hours": 24,
        "members": 10,
        "seed": 5,
        "retention": 50,
        "output": "out",
        "quicklook": False,
        # stochastic world and filter, so that the per-cycle seed matters
        "world": {"source": "physical:l96", "options": {"n": 40, "noise_std": 0.05}},
        "method": {"name": "enkf", "options": {"inflation": 1.05}},
        "observations": {
            "inbox": "inbox",
            "pattern": "obs_{cycle:%Y%m%dT%H}.nc",
            "variable": "x",
            "units": "1",
            "operator": "identity",
            "sigma": 1.0,
        },
        "cold_start": {"mean": 8.0, "std": 1.0, "spinup_steps": 20},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return data


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer (scalars and nested tables) for test configs."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, prefix=f"{name}."))
    return "\n".join(lines)


def write_config(folder: Path, **overrides: Any) -> tuple[Path, CycleConfig]:
    path = Path(folder) / "cycle.toml"
    path.write_text(to_toml(base_config(**overrides)) + "\n", encoding="utf-8")
    return path, load_config(path)


def fill_inbox(cfg: CycleConfig, n_cycles: int, seed: int = 3) -> torch.Tensor:
    """Synthetic observation files for the first ``n_cycles`` cycles from a spun-up
    L96 truth; returns the truth at the cycle times."""
    comp = build_components(cfg)
    gen = torch.Generator().manual_seed(seed)
    x0 = 8.0 + torch.randn(comp.world.state_shape, generator=gen, dtype=comp.dtype)
    for _ in range(100):
        x0 = comp.world.step(x0.unsqueeze(0))[0]
    times = [cfg.start + k * cfg.interval for k in range(n_cycles)]
    return synthetic_inbox(cfg, times, comp.world, comp.observation, x0, seed=seed)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the lock and the log."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name not in (".lock", "cycle.log"):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
