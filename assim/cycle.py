"""The nightly forecast cycle: idempotent, locked, restartable, catches up.

One cycle at time ``T`` (DESIGN.md §2, "Nightly cycle"):

1. validate the observation file ``inbox / pattern(T)`` (missing: forecast-only);
2. read the restart ensemble of cycle ``T - interval`` (missing: cold start from
   climatology, flagged);
3. step the ensemble ``steps_per_cycle`` times from ``T - interval`` to ``T``,
   assimilating the observations that fall on each step (``Filter.cycle``);
4. forecast ``forecast_steps`` steps from the analysis at ``T``;
5. write ``analysis.nc``, ``forecast.nc``, ``restart.nc``, ``quicklook.png`` and,
   last, ``record.json`` into ``out/.tmp-<name>-<pid>/``, fsync, then
   ``os.rename`` it to ``out/<YYYYmmddTHH>/``. A folder under its final name is
   therefore always complete; ``record.json`` is the completeness marker.

The random seed of cycle ``T`` is ``sha256(seed, T)``, so a rerun writes the same
netCDF bytes. A lock (``flock`` on ``out/.lock``, holding the PID) serialises runs;
leftovers of killed runs (``.tmp-*``, ``.trash-*``) are removed under the lock.
Retention prunes old cycle folders after every complete cycle, run or skipped (so a
rerun tidies up after a run killed between its rename and its prune), renaming them
to ``.trash-*`` first, so a half-deleted folder never looks complete.

Exit codes of ``assim cycle``: 0 done / skipped / forecast-only (warning);
2 bad config or arguments; 65 bad observation or restart data (EX_DATAERR);
66 restart missing with cold start disabled (EX_NOINPUT); 75 lock held (EX_TEMPFAIL).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from assim.cycle_config import CycleConfig, cycle_name, parse_cycle_time
from assim.cycle_files import DataError, fsync_path, sha256, versions, write_record
from assim.cycle_store import (
    RECORD,
    CycleLock,
    LockBusy,
    clean_leftovers,
    complete_cycles,
    cycle_seed,
    discard,
    is_complete,
    prune,
)
from assim.errors import InputError
from assim.rng import randn

__all__ = [
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_TEMPFAIL",
    "Components",
    "CycleLock",
    "CycleResult",
    "DataError",
    "LockBusy",
    "MissingRestart",
    "catch_up",
    "complete_cycles",
    "cycle_seed",
    "is_complete",
    "pending_cycles",
    "run_cycle",
]

log = logging.getLogger("assim.cycle")

EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL = 65, 66, 75


class MissingRestart(InputError):
    """The previous restart is missing and cold start is disabled (exit 66)."""


# ---------------------------------------------------------------------------------------
# components


@dataclass
class Components:
    """What a cycle needs besides files: a world (``step``, ``forecast``,
    ``state_shape``), a filter (``Filter.cycle``) and an observation (``h``)."""

    world: Any
    filter: Any
    observation: Any
    device: torch.device
    dtype: torch.dtype = torch.float64


def build_components(cfg: CycleConfig) -> Components:
    """Build the world (``physical:<name>`` or a checkpoint), the filter and the
    observation model named by the config."""
    from models.device import resolve_device

    device = resolve_device(cfg.device)
    opts = dict(cfg.world.options)
    if cfg.world.physical is not None:
        from models.worlds.physical import physical_world

        try:
            world = physical_world(cfg.world.physical, **opts)
        except (ValueError, TypeError) as exc:
            raise InputError(f"[world] source {cfg.world.source!r} / options: {exc}") from None
    else:
        import models

        if not Path(cfg.world.source).is_file():
            raise InputError(f"world checkpoint {cfg.world.source} not found")
        world = models.load(cfg.world.source, device=device)
    if hasattr(world, "to"):
        world = world.to(device)
    from assim.obs import make_observation

    filt = make_method(cfg.method.name, dict(cfg.method.options), world)
    obs = make_observation(cfg.observations.operator, cfg.observations.sigma)
    dtype = getattr(world, "dtype", None)
    if dtype is None and hasattr(world, "parameters"):  # a learned world (nn.Module)
        dtype = next(iter(world.parameters()), torch.empty(0)).dtype
    dtype = dtype or torch.float64
    return Components(world, filt, obs, device, dtype)


def make_method(name: str, options: dict[str, Any], world: Any = None) -> Any:
    """A filter by name: ``pf`` (bootstrap particle filter), ``dpf`` (diffusion
    particle filter, learned worlds), else the ensemble Kalman family
    (``enkf``, ``etkf``, ``letkf``; :func:`assim.filters.enkf.make_filter`)."""
    key = name.lower()
    try:
        if key in ("pf", "bootstrap", "bootstrap-pf"):
            from assim.filters.pf import BootstrapPF

            return BootstrapPF(**options)
        if key == "dpf":
            from assim.filters.dpf import make_dpf

            return make_dpf(world, **options)
    except TypeError as exc:
        raise InputError(f"method {name!r}: bad option ({exc})") from None
    from assim.filters.enkf import make_filter

    return make_filter(name, **options)


# ---------------------------------------------------------------------------------------
# one cycle


@dataclass(frozen=True)
class CycleResult:
    time: datetime
    folder: Path
    status: str  # "done" or "skipped"
    cold_start: bool = False
    forecast_only: bool = False


def _cold_start(cfg: CycleConfig, comp: Components, gen: torch.Generator) -> torch.Tensor:
    """Climatological ensemble ``(N, *S)``: ``mean + std * z`` then free spin-up."""
    shape = (cfg.members, *comp.world.state_shape)
    z = randn(shape, gen, device=gen.device, dtype=comp.dtype)
    x = (cfg.cold_start.mean + cfg.cold_start.std * z).to(comp.device)
    for _ in range(cfg.cold_start.spinup_steps):
        x = comp.world.step(x, generator=gen)
    return x


def _run_one(cfg: CycleConfig, t: datetime, comp: Components) -> CycleResult:
    from assim.cycle_files import (
        analysis_dataset,
        forecast_dataset,
        read_observations,
        read_restart,
        restart_dataset,
        write_netcdf,
        write_quicklook,
    )
    from assim.filters.base import Ensemble

    out, name = cfg.output, cycle_name(t)
    final = out / name
    if is_complete(final):
        log.info("cycle %s: complete, skipped", name)
        return CycleResult(t, final, "skipped")
    started, timings, tick = datetime.now(timezone.utc), {}, time.perf_counter()
    seed = cycle_seed(cfg.seed, t)
    gen = torch.Generator(device=comp.device).manual_seed(seed)
    inputs: dict[str, Any] = {}
    if cfg.source is not None:
        inputs["config"] = {"path": str(cfg.source), "sha256": sha256(cfg.source)}
    if cfg.world.physical is None:
        inputs["world"] = {"path": cfg.world.source, "sha256": sha256(cfg.world.source)}
    shape = tuple(comp.world.state_shape)
    m = comp.observation.dim(shape)

    # 1. observations
    obs_path = cfg.observations.path(t)
    ys: dict[int, torch.Tensor] = {}
    forecast_only = not obs_path.exists()
    if forecast_only:
        log.warning("cycle %s: no observation file %s: forecast-only cycle", name, obs_path)
    else:
        ys = read_observations(obs_path, cfg, t, m, comp.dtype, comp.device)
        inputs["observations"] = {
            "path": str(obs_path),
            "sha256": sha256(obs_path),
            "times": len(ys),
        }
        log.info("cycle %s: %d observation times from %s", name, len(ys), obs_path)

    # 2. restart or cold start
    prev = out / cycle_name(t - cfg.interval)
    cold = not is_complete(prev)
    if not cold:
        x, log_w = read_restart(prev / "restart.nc", cfg.members, shape, comp.dtype, comp.device)
        inputs["restart"] = {
            "path": str(prev / "restart.nc"),
            "sha256": sha256(prev / "restart.nc"),
        }
    elif not cfg.cold_start.enabled:
        raise MissingRestart(
            f"cycle {name}: previous restart {prev / 'restart.nc'} is "
            f"missing and [cold_start] enabled = false"
        )
    else:
        log.warning("cycle %s: no restart from %s: cold start from climatology", name, prev.name)
        x, log_w = _cold_start(cfg, comp, gen), None
    ens = Ensemble(x, log_w)
    timings["read_s"] = time.perf_counter() - tick

    # 3. assimilate
    tick = time.perf_counter()
    diag: dict[str, list] = {"times": [], "ess": [], "log_z": [], "inflation": []}
    last_y = None
    for k in range(1, cfg.steps_per_cycle + 1):
        y = ys.get(k)
        ens, info = comp.filter.cycle(comp.world, ens, y, comp.observation, generator=gen)
        if y is not None:
            last_y = y
            diag["times"].append(t - cfg.interval + k * cfg.step)
            diag["ess"].append(float(info.get("ess", float("nan"))))
            diag["log_z"].append(float(info.get("log_z", float("nan"))))
            diag["inflation"].append(float(info.get("inflation", float("nan"))))
    timings["assimilate_s"] = time.perf_counter() - tick

    # 4. forecast
    tick = time.perf_counter()
    n_fc = cfg.forecast_steps
    fc = comp.world.forecast(ens.x, n_fc, members=cfg.members, generator=gen) if n_fc else None
    timings["forecast_s"] = time.perf_counter() - tick

    # 5. write into a temporary sibling folder, record last, then rename
    tick = time.perf_counter()
    flags = {"cold_start": cold, "forecast_only": forecast_only}
    units = cfg.world.units or (
        cfg.observations.units if cfg.observations.operator == "identity" else "1"
    )
    tmp = out / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {
        "analysis.nc": analysis_dataset(cfg, t, ens.x, ens.log_w, diag, flags, units),
        "restart.nc": restart_dataset(cfg, t, ens.x, ens.log_w, flags, units),
    }
    if fc is not None:
        files["forecast.nc"] = forecast_dataset(cfg, t, fc, ens.log_w, flags, units)
    for fname, ds in files.items():
        write_netcdf(ds, tmp / fname)
    if cfg.quicklook:
        write_quicklook(
            tmp / "quicklook.png",
            t,
            ens.x,
            fc,
            last_y,
            flags,
            f"{cfg.world.source} · {cfg.method.name} · N={cfg.members}",
        )
    timings["write_s"] = time.perf_counter() - tick
    ess = [v for v in diag["ess"] if v == v]
    record = {
        "cycle": t.isoformat(timespec="minutes"),
        "status": "ok",
        "flags": flags,
        "seed": {"config": cfg.seed, "cycle": seed},
        "method": {"name": cfg.method.name, "options": dict(cfg.method.options)},
        "world": {"source": cfg.world.source, "options": dict(cfg.world.options)},
        "members": cfg.members,
        "inputs": inputs,
        "outputs": {p.name: sha256(p) for p in sorted(tmp.iterdir())},
        "diagnostics": {
            "obs_times": [s.isoformat(timespec="minutes") for s in diag["times"]],
            "ess": diag["ess"],
            "log_evidence": diag["log_z"],
            "inflation": diag["inflation"],
            "ess_min": min(ess) if ess else None,
            "log_evidence_total": sum(diag["log_z"]) if diag["log_z"] else None,
        },
        "versions": versions(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": platform.node(),
    }
    write_record(tmp / RECORD, record)
    fsync_path(tmp)
    if final.exists():  # an incomplete folder under the final name (not ours): discard
        log.warning("cycle %s: replacing incomplete folder %s", name, final)
        discard(final)
    os.rename(tmp, final)
    fsync_path(out)
    level = logging.WARNING if (cold or forecast_only) else logging.INFO
    log.log(
        level,
        "cycle %s: done%s%s (ESS min %s, log-evidence %s) -> %s",
        name,
        " [cold start]" if cold else "",
        " [forecast only]" if forecast_only else "",
        record["diagnostics"]["ess_min"],
        record["diagnostics"]["log_evidence_total"],
        final,
    )
    return CycleResult(t, final, "done", cold, forecast_only)


# ---------------------------------------------------------------------------------------
# entry points


def _check_time(cfg: CycleConfig, t: datetime) -> None:
    if not cfg.is_cycle_time(t):
        raise InputError(
            f"cycle time {t:%Y-%m-%dT%H:%M} is not on the cycle grid "
            f"(start {cfg.start:%Y-%m-%dT%H:%M}, every {cfg.interval_hours:g} h)"
        )


def pending_cycles(cfg: CycleConfig, until: datetime) -> list[datetime]:
    """Missed cycles up to ``until``, oldest first: the grid times from the oldest
    complete cycle still kept (or ``start``) without a complete folder, so that
    cycles removed by retention are not rerun."""
    done = complete_cycles(cfg.output)
    first = max(cfg.start, done[0]) if done else cfg.start
    kept = set(done)
    return [t for t in cfg.cycle_times(first, until) if t not in kept]


def run_cycle(
    cfg: CycleConfig,
    t: datetime | str,
    components: Components | None = None,
    *,
    lock: bool = True,
) -> CycleResult:
    """Run (or skip, when complete) the cycle at ``t``; takes the lock unless the
    caller already holds it (``lock=False``)."""
    t = parse_cycle_time(t) if isinstance(t, str) else t
    _check_time(cfg, t)
    return catch_up(cfg, t, components, only=[t], lock=lock)[0]


def catch_up(
    cfg: CycleConfig,
    until: datetime | str | None = None,
    components: Components | None = None,
    only: list[datetime] | None = None,
    *,
    lock: bool = True,
) -> list[CycleResult]:
    """Run every missed cycle up to ``until`` (default: now, UTC), oldest first, each
    chained on the previous restart (see :func:`pending_cycles`). Stops at the first
    failing cycle (its error propagates; earlier cycles stay). Prunes per retention
    after each complete (done or skipped) cycle. ``lock=False``: the caller holds
    :class:`CycleLock`."""
    if until is None:
        until = datetime.now(timezone.utc).replace(tzinfo=None)
    until = parse_cycle_time(until) if isinstance(until, str) else until
    if lock:
        with CycleLock(cfg.output):
            return catch_up(cfg, until, components, only, lock=False)
    clean_leftovers(cfg.output)
    todo = only if only is not None else pending_cycles(cfg, until)
    if not todo:
        log.info("nothing to do: every cycle up to %s is complete", cycle_name(until))
        return []
    if only is None:
        log.info(
            "catch-up: %d cycle(s) from %s to %s",
            len(todo),
            cycle_name(todo[0]),
            cycle_name(todo[-1]),
        )
    comp = components or build_components(cfg)
    results = []
    for t in todo:
        res = _run_one(cfg, t, comp)
        results.append(res)
        # also after a skip: a run killed between its rename and its prune left the
        # cycle complete but the retention not applied; pruning is idempotent
        prune(cfg.output, cfg.retention)
    return results
