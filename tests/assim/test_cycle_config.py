"""Cycle configuration: validation names the key, times and the cycle grid, seeds."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from assim.cli import main
from assim.cycle_config import config_from_dict, cycle_name, load_config, parse_cycle_time
from assim.cycle_store import cycle_seed
from assim.errors import InputError
from tests.assim.test_cycle_helpers import T0, base_config, to_toml, write_config


def test_example_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "experiments" / "cycle_l96.toml")
    assert cfg.world.physical == "l96" and cfg.forecast_steps == 8 and cfg.members == 40
    assert cfg.step == timedelta(hours=6)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ({"memberz": 3}, "memberz", "unknown key"),
        ({"observations": {"sigm": 1.0}}, "observations.sigm", "unknown key"),
        ({"members": 1}, "members", "an integer >= 2"),
        ({"members": "ten"}, "members", "expected int"),
        ({"seed": True}, "seed", "expected int"),
        ({"interval_hours": 0}, "interval_hours", "a positive number"),
        ({"forecast_hours": 7}, "forecast_hours", "multiple of the step"),
        ({"retention": 0}, "retention", "an integer >= 1"),
        ({"start": "tomorrow"}, "start", "expected ISO 8601"),
        ({"observations": {"sigma": -1.0}}, "observations.sigma", "a positive number"),
        ({"observations": {"pattern": "obs.nc"}}, "observations.pattern", "{cycle"),
        ({"observations": {"pattern": "{cycle:%Y}{x}.nc"}}, "observations.pattern", "cannot be"),
        ({"cold_start": {"spinup_steps": -1}}, "cold_start.spinup_steps", ">= 0"),
        ({"world": {"source": ""}}, "world.source", "expected"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, key, expected):
    with pytest.raises(InputError) as err:
        config_from_dict(base_config(**override), tmp_path, "my.toml")
    msg = str(err.value)
    assert msg.startswith(f"my.toml: key '{key}'") and expected in msg, msg


def test_missing_required_key(tmp_path):
    data = base_config()
    del data["observations"]["variable"]
    with pytest.raises(InputError, match=r"key 'observations.variable': missing \(required\)"):
        config_from_dict(data, tmp_path)


def test_cli_reports_config_and_argument_errors_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(to_toml(base_config(members=1)))
    assert main(["cycle", "--config", str(bad), "--cycle", "2026-11-01T00"]) == 2
    assert "bad.toml: key 'members'" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("members = [")
    assert main(["cycle", "--config", str(tmp_path / "broken.toml"), "--catch-up"]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    path, _ = write_config(tmp_path)
    assert main(["cycle", "--config", str(path), "--cycle", "2026-11-01T05"]) == 2
    assert "not on the cycle grid" in capsys.readouterr().err
    assert main(["cycle", "--config", str(path), "--cycle", "2026-10-31T00"]) == 2
    assert main(["cycle", "--config", str(path), "--cycle", "2026-11-01T00", "--until", "x"]) == 2
    assert "--until only goes with --catch-up" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26T00",
        "2026-11-26T00:00",
        "2026-11-26T00:00Z",
        "20261126T00",
        "2026-11-26T01:00+01:00",
    ],
)
def test_parse_cycle_time(text):
    assert parse_cycle_time(text) == datetime(2026, 11, 26, 0)
    assert cycle_name(parse_cycle_time(text)) == "20261126T00"


def test_cycle_grid(tmp_path):
    cfg = config_from_dict(
        base_config(interval_hours=6, steps_per_cycle=1, forecast_hours=0), tmp_path
    )
    t = datetime(2026, 11, 2, 7, 30)
    assert cfg.latest_cycle(t) == datetime(2026, 11, 2, 6)
    assert cfg.latest_cycle(T0 - timedelta(hours=1)) is None
    assert cfg.cycle_times(datetime(2026, 11, 1, 1), t) == [
        T0 + timedelta(hours=h) for h in (6, 12, 18, 24, 30)
    ]
    assert cfg.is_cycle_time(T0 + timedelta(hours=18))
    assert not cfg.is_cycle_time(T0 + timedelta(hours=19))
    assert not cfg.is_cycle_time(T0 - timedelta(hours=6))


def test_cycle_seed_is_deterministic_and_distinct():
    seeds = {cycle_seed(s, T0 + timedelta(hours=h)) for s in range(5) for h in range(0, 240, 6)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert cycle_seed(3, T0) == cycle_seed(3, datetime(2026, 11, 1))
