"""The nightly cycle in-process: outputs, reproducibility, flags, catch-up chaining,
retention, leftovers and the lock (crash and concurrency: test_cycle_crash.py; bad
inputs: test_cycle_bad_input.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from assim.cli import main
from assim.cycle import build_components, catch_up, cycle_seed, pending_cycles, run_cycle
from assim.cycle_config import cycle_name
from assim.cycle_files import read_observations, sha256
from assim.cycle_store import CycleLock, complete_cycles
from assim.filters.base import Ensemble
from tests.assim.test_cycle_helpers import T0, fill_inbox, tree_hashes, write_config

DAY = timedelta(days=1)
NC = ("analysis.nc", "forecast.nc", "restart.nc")


def _record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def _state(path: Path) -> torch.Tensor:
    with xr.open_dataset(path) as ds:
        return torch.from_numpy(ds["state"].values.copy())


def test_one_cycle_writes_cf_files_png_and_record(tmp_path, capsys):
    path, cfg = write_config(tmp_path, quicklook=True)
    fill_inbox(cfg, 1)
    assert main(["cycle", "--config", str(path), "--cycle", "2026-11-01T00"]) == 0
    folder = cfg.output / "20261101T00"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*NC, "quicklook.png", "record.json"])
    assert (folder / "quicklook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = _record(folder)
    assert rec["status"] == "ok" and rec["flags"] == {"cold_start": True, "forecast_only": False}
    obs = cfg.observations.path(T0)
    assert rec["inputs"]["observations"] == {"path": str(obs), "sha256": sha256(obs), "times": 2}
    assert rec["inputs"]["config"]["sha256"] == sha256(path)
    for name, digest in rec["outputs"].items():
        assert sha256(folder / name) == digest
    assert rec["seed"]["cycle"] == cycle_seed(5, T0)
    assert len(rec["diagnostics"]["ess"]) == 2 and set(rec["versions"]) >= {"torch", "xarray"}
    with xr.open_dataset(folder / "analysis.nc") as a, xr.open_dataset(folder / "forecast.nc") as f:
        assert a.attrs["Conventions"] == "CF-1.8" and "history" not in a.attrs
        assert a.attrs["cold_start"] == 1 and a.attrs["forecast_only"] == 0
        assert a["member"].attrs["standard_name"] == "realization"
        assert a["state"].dims == ("member", "x") and a["state"].shape == (10, 40)
        assert f["state"].dims == ("member", "time", "x")
        np.testing.assert_array_equal(f["forecast_period"].values, [12.0, 24.0])
        assert f["forecast_period"].attrs["units"] == "hours"
        assert f["forecast_reference_time"].values == np.datetime64("2026-11-01T00")
        assert list(f["time"].values) == list(
            np.array(["2026-11-01T12", "2026-11-02T00"], dtype="datetime64[ns]")
        )
    log = (cfg.output / "cycle.log").read_text()
    assert "cold start" in log and "20261101T00: done" in log


def test_rerun_skips_and_recompute_gives_identical_bytes(tmp_path):
    path, cfg = write_config(tmp_path, quicklook=True)
    fill_inbox(cfg, 2)
    catch_up(cfg, T0 + DAY)
    before = tree_hashes(cfg.output)
    assert run_cycle(cfg, T0 + DAY).status == "skipped"
    assert tree_hashes(cfg.output) == before  # untouched, record included
    folder = cfg.output / "20261102T00"
    old = _record(folder)
    os.rename(folder, tmp_path / "first")
    assert run_cycle(cfg, "2026-11-02T00").status == "done"
    for name in (*NC, "quicklook.png"):
        assert (folder / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    new = _record(folder)
    for key in ("started_utc", "finished_utc", "timings_s", "pid"):
        old.pop(key), new.pop(key)
    assert new == old


def test_forecast_only_cycle_is_flagged_and_is_the_free_forecast(tmp_path, caplog):
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 1)  # no file for the second cycle
    catch_up(cfg, T0)
    with caplog.at_level(logging.WARNING, logger="assim.cycle"):
        assert main(["cycle", "--config", str(path), "--cycle", "2026-11-02T00"]) == 0
    assert any(
        "forecast-only" in r.getMessage() and "obs_20261102T00.nc" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
    assert "WARNING" in (log := (cfg.output / "cycle.log").read_text()) and "forecast-only" in log
    folder = cfg.output / "20261102T00"
    rec = _record(folder)
    assert rec["flags"] == {"cold_start": False, "forecast_only": True}
    assert "observations" not in rec["inputs"] and rec["diagnostics"]["ess"] == []
    # no analysis: the "analysis" is two noisy world steps from the restart, with the
    # cycle's own seed
    world = build_components(cfg).world
    x0 = _state(cfg.output / "20261101T00" / "restart.nc")
    gen = torch.Generator().manual_seed(cycle_seed(cfg.seed, T0 + DAY))
    x = world.step(world.step(x0, gen), gen)
    assert torch.equal(_state(folder / "analysis.nc"), x)
    assert not torch.equal(x, world.deterministic_step(world.deterministic_step(x0)))
    with xr.open_dataset(folder / "analysis.nc") as a:
        assert a.attrs["forecast_only"] == 1


def test_catch_up_30_cycles_in_order_chaining_restarts(tmp_path, caplog):
    """30 missed cycles: run oldest first, each reading the previous restart; three of
    them are replayed by hand (restart -> filter steps with the cycle seed) and must
    match bit for bit; refilling a gap reproduces the same bytes."""
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 30)
    last = T0 + 29 * DAY
    assert pending_cycles(cfg, last) == [T0 + k * DAY for k in range(30)]
    with caplog.at_level(logging.INFO, logger="assim.cycle"):
        results = catch_up(cfg, last)
    assert [r.time for r in results] == [T0 + k * DAY for k in range(30)]
    done = [r.getMessage().split(":")[0] for r in caplog.records if ": done" in r.getMessage()]
    assert done == [f"cycle {cycle_name(T0 + k * DAY)}" for k in range(30)]
    assert complete_cycles(cfg.output) == [r.time for r in results]
    assert [r.cold_start for r in results] == [True] + [False] * 29
    for k in range(1, 30):
        prev = cfg.output / cycle_name(T0 + (k - 1) * DAY) / "restart.nc"
        rec = _record(cfg.output / cycle_name(T0 + k * DAY))
        assert rec["inputs"]["restart"] == {"path": str(prev), "sha256": sha256(prev)}
    comp = build_components(cfg)
    for k in (1, 14, 29):
        t = T0 + k * DAY
        with xr.open_dataset(cfg.output / cycle_name(t - DAY) / "restart.nc") as r:
            ens = Ensemble(
                torch.from_numpy(r["state"].values.copy()),
                torch.from_numpy(r["log_weight"].values.copy()),
            )
        ys = read_observations(cfg.observations.path(t), cfg, t, 40)
        gen = torch.Generator().manual_seed(cycle_seed(cfg.seed, t))
        for step in (1, 2):
            ens, _ = comp.filter.cycle(comp.world, ens, ys[step], comp.observation, gen)
        assert torch.equal(_state(cfg.output / cycle_name(t) / "analysis.nc"), ens.x)
    # a gap in the middle is "missed": refilled alone, with identical bytes
    before = tree_hashes(cfg.output)
    for k in (10, 11):
        os.rename(cfg.output / cycle_name(T0 + k * DAY), tmp_path / f"gap{k}")
    assert pending_cycles(cfg, last) == [T0 + 10 * DAY, T0 + 11 * DAY]
    assert [r.time for r in catch_up(cfg, last)] == [T0 + 10 * DAY, T0 + 11 * DAY]
    after = tree_hashes(cfg.output)
    assert {k: v for k, v in after.items() if not k.endswith("record.json")} == {
        k: v for k, v in before.items() if not k.endswith("record.json")
    }
    assert catch_up(cfg, last) == []


def test_retention_prunes_after_success_only_and_pruned_cycles_are_not_missed(tmp_path):
    path, cfg = write_config(tmp_path, retention=3)
    fill_inbox(cfg, 5)
    (cfg.observations.path(T0 + 5 * DAY)).write_bytes(b"not a netCDF file")
    catch_up(cfg, T0 + 4 * DAY)
    kept = [T0 + k * DAY for k in (2, 3, 4)]
    assert complete_cycles(cfg.output) == kept
    assert pending_cycles(cfg, T0 + 4 * DAY) == []  # pruned cycles are not rerun
    assert main(["cycle", "--config", str(path), "--catch-up", "--until", "2026-11-06T00"]) == 65
    assert complete_cycles(cfg.output) == kept  # a failed cycle prunes nothing
    assert not any(p.name.startswith(".") and p.is_dir() for p in cfg.output.iterdir())


def test_a_skipped_rerun_applies_the_retention(tmp_path):
    """A run killed between its final rename and its prune leaves a complete cycle and
    too many folders; the rerun skips the cycle but still prunes (the kill window is
    stood in for by tightening the retention between the two runs)."""
    _, cfg = write_config(tmp_path, retention=3)
    fill_inbox(cfg, 3)
    catch_up(cfg, T0 + 2 * DAY)
    assert complete_cycles(cfg.output) == [T0 + k * DAY for k in range(3)]
    _, tight = write_config(tmp_path, retention=1)
    assert run_cycle(tight, T0 + 2 * DAY).status == "skipped"
    assert complete_cycles(cfg.output) == [T0 + 2 * DAY]


def test_leftovers_of_killed_runs_are_cleaned(tmp_path):
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 1)
    cfg.output.mkdir(parents=True)
    (cfg.output / ".tmp-20261101T00-99999").mkdir()
    (cfg.output / ".tmp-20261101T00-99999" / "analysis.nc").write_bytes(b"half")
    (cfg.output / ".trash-20261025T00-99999").mkdir()
    (cfg.output / "20261101T00").mkdir()  # incomplete: no record.json
    (cfg.output / "20261101T00" / "analysis.nc").write_bytes(b"half")
    assert pending_cycles(cfg, T0) == [T0]
    assert run_cycle(cfg, T0).status == "done"
    names = sorted(p.name for p in cfg.output.iterdir())
    assert names == [".lock", "20261101T00"]
    assert sorted(_record(cfg.output / "20261101T00")["outputs"]) == sorted(NC)


def test_held_lock_exits_75_naming_the_pid(tmp_path, capsys):
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 1)
    with CycleLock(cfg.output):
        assert (cfg.output / ".lock").read_text().strip() == str(os.getpid())
        rc = main(["cycle", "--config", str(path), "--cycle", "2026-11-01T00"])
    assert rc == 75
    assert f"held by process {os.getpid()}" in capsys.readouterr().err
    assert not (cfg.output / "20261101T00").exists()
    assert main(["cycle", "--config", str(path), "--cycle", "2026-11-01T00"]) == 0


def test_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 1)
    cfg.output.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, str(os.getpid()).encode()); print('locked', flush=True)\n"
            "time.sleep(60)",
            str(cfg.output / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match=f"held by process {holder.pid}"):
        run_cycle(cfg, T0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (cfg.output / ".lock").read_text().strip() == str(holder.pid)  # stale content
    assert run_cycle(cfg, T0).status == "done"


def test_run_demo_cycles_three_chained_cycles_with_pngs(tmp_path):
    from assim.cycle_demo import run_demo_cycles

    folders = run_demo_cycles(tmp_path)
    assert [f.name for f in folders] == ["20261124T00", "20261125T00", "20261126T00"]
    flags = [_record(f)["flags"] for f in folders]
    assert flags == [{"cold_start": c, "forecast_only": False} for c in (True, False, False)]
    for prev, f in zip(folders, folders[1:], strict=False):
        assert _record(f)["inputs"]["restart"]["sha256"] == sha256(prev / "restart.nc")
        assert (f / "quicklook.png").stat().st_size > 1000


def test_weighted_particle_restart_round_trips(tmp_path):
    """A bootstrap PF that never resamples carries non-uniform weights from cycle to
    cycle through restart.nc; replaying a cycle from the restart (x, log_w) with the
    cycle's seed reproduces its analysis and weights exactly."""
    path, cfg = write_config(tmp_path, method={"name": "pf", "options": {"threshold": 0.0}})
    fill_inbox(cfg, 3)
    catch_up(cfg, T0 + 2 * DAY)
    t = T0 + 2 * DAY
    with xr.open_dataset(cfg.output / cycle_name(t - DAY) / "restart.nc") as r:
        ens = Ensemble(
            torch.from_numpy(r["state"].values.copy()),
            torch.from_numpy(r["log_weight"].values.copy()),
        )
    assert float(ens.log_w.std()) > 0.1  # genuinely weighted
    comp = build_components(cfg)
    ys = read_observations(cfg.observations.path(t), cfg, t, 40)
    gen = torch.Generator().manual_seed(cycle_seed(cfg.seed, t))
    for step in (1, 2):
        ens, _ = comp.filter.cycle(comp.world, ens, ys[step], comp.observation, gen)
    with xr.open_dataset(cfg.output / cycle_name(t) / "analysis.nc") as a:
        assert torch.equal(torch.from_numpy(a["state"].values), ens.x)
        assert torch.equal(torch.from_numpy(a["log_weight"].values), ens.log_w)
