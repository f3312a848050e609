"""Configuration of the nightly forecast cycle (``assim cycle``).

A cycle configuration is a frozen dataclass read from TOML. Every key is
checked (type, range, unknown keys) and an error names the file and the key::

    start = "2026-11-01T00"        # first cycle; anchors the cycle grid
    interval_hours = 24            # time between two cycles
    steps_per_cycle = 4            # physical world steps between two cycles
    forecast_hours = 48            # multiple of interval_hours / steps_per_cycle
    members = 20
    seed = 1234                    # the seed of cycle T is derived from (seed, T)
    retention = 10                 # complete cycle folders kept
    output = "out/l96"             # relative paths are relative to this file
    threads = 1                    # torch threads (1: bitwise reproducible reruns)
    device = "cpu"

    [world]
    source = "physical:l96"        # or a checkpoint path for models.load
    units = "1"                    # of the state (default: observation units)
    [world.options]                # passed to the world constructor
    n = 40

    [method]
    name = "etkf"                  # anything assim.filters.make_filter knows
    [method.options]
    inflation = 1.02

    [observations]
    inbox = "inbox"
    pattern = "obs_{cycle:%Y%m%dT%H}.nc"
    variable = "x"
    units = "1"
    operator = "identity"
    sigma = 1.0

    [cold_start]                   # used when the previous restart is missing
    mean = 8.0                     # x0 = mean + std * N(0, I) per member ...
    std = 1.0
    spinup_steps = 200             # ... run freely this many steps (climatology)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from assim.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ColdStartSpec",
    "CycleConfig",
    "MethodSpec",
    "ObservationSpec",
    "WorldSpec",
    "cycle_name",
    "load_config",
    "parse_cycle_time",
]

CYCLE_NAME_FORMAT = "%Y%m%dT%H"


def parse_cycle_time(text: str) -> datetime:
    """Parse ``2026-11-26T00``, ``2026-11-26T00:00Z``, ``20261126T00`` ... as a naive
    UTC datetime (an offset, when given, is converted to UTC)."""
    s = str(text).strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        try:
            t = datetime.strptime(s, CYCLE_NAME_FORMAT)
        except ValueError:
            raise InputError(f"cycle time {text!r}: expected ISO 8601 like 2026-11-26T00") from None
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def cycle_name(t: datetime) -> str:
    """Folder name of the cycle at ``t``: ``YYYYmmddTHH`` (plus ``MM`` when not on the
    hour, so that sub-hourly cycles do not collide)."""
    name = t.strftime(CYCLE_NAME_FORMAT)
    if t.minute or t.second:
        name += t.strftime("%M%S")
    return name


@dataclass(frozen=True)
class WorldSpec:
    """``source``: ``physical:<name>`` (e.g. ``physical:l96``) or a checkpoint path."""

    source: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    units: str | None = None  # of the state; default: the observation units (identity)

    @property
    def physical(self) -> str | None:
        return self.source.split(":", 1)[1] if self.source.startswith("physical:") else None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ObservationSpec:
    """Observation inbox: the file of cycle ``T`` is ``inbox / pattern.format(cycle=T)``
    and holds ``variable`` ``(time, *O)`` in ``units``; ``O`` is the shape of
    ``operator(x)``; Gaussian noise of standard deviation ``sigma``."""

    inbox: Path
    pattern: str
    variable: str
    units: str
    operator: str = "identity"
    sigma: float = 1.0

    def path(self, t: datetime) -> Path:
        return self.inbox / self.pattern.format(cycle=t)


@dataclass(frozen=True)
class ColdStartSpec:
    """Cold start from climatology: ``x0 = mean + std * N(0, I)`` for every member,
    then ``spinup_steps`` free world steps, so that members are (approximately)
    independent draws of the model climate. ``enabled = false`` makes a missing
    restart an error instead."""

    enabled: bool = True
    mean: float = 0.0
    std: float = 1.0
    spinup_steps: int = 0


@dataclass(frozen=True)
class CycleConfig:
    start: datetime
    interval_hours: float
    steps_per_cycle: int
    forecast_hours: float
    members: int
    seed: int
    retention: int
    output: Path
    world: WorldSpec
    method: MethodSpec
    observations: ObservationSpec
    cold_start: ColdStartSpec = ColdStartSpec()
    threads: int = 1
    device: str = "cpu"
    quicklook: bool = True
    source: Path | None = None  # the TOML file, for messages and the run record

    @property
    def interval(self) -> timedelta:
        return timedelta(hours=self.interval_hours)

    @property
    def step(self) -> timedelta:
        """Physical time between two world steps."""
        return self.interval / self.steps_per_cycle

    @property
    def forecast_steps(self) -> int:
        return round(self.forecast_hours * self.steps_per_cycle / self.interval_hours)

    def is_cycle_time(self, t: datetime) -> bool:
        n = (t - self.start) / self.interval
        return t >= self.start and abs(n - round(n)) < 1e-9

    def cycle_times(self, first: datetime, last: datetime) -> list[datetime]:
        """Cycle times ``first <= T <= last`` on the grid ``start + k * interval``."""
        k0 = max(0, math.ceil((first - self.start) / self.interval - 1e-9))
        out, k = [], k0
        while (t := self.start + k * self.interval) <= last:
            out.append(t)
            k += 1
        return out

    def latest_cycle(self, now: datetime) -> datetime | None:
        """The last cycle time ``<= now`` (``None`` before ``start``)."""
        if now < self.start:
            return None
        return self.start + math.floor((now - self.start) / self.interval + 1e-9) * self.interval


# ---------------------------------------------------------------------------------------
# loading and validation


class _Table:
    """A TOML table that remembers where it came from and which keys were read."""

    def __init__(self, data: Any, where: str, origin: str) -> None:
        if not isinstance(data, dict):
            raise InputError(f"{origin}: '{where}' must be a table")
        self.data, self.where, self.origin, self.seen = data, where, origin, set()

    def _key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else k

    def err(self, k: str, msg: str) -> InputError:
        return InputError(f"{self.origin}: key '{self._key(k)}': {msg}")

    def get(self, k: str, kind: type | tuple, default: Any = ..., check=None, what=""):
        self.seen.add(k)
        if k not in self.data:
            if default is ...:
                raise self.err(k, "missing (required)")
            return default
        v = self.data[k]
        ok = isinstance(v, kind) and not (isinstance(v, bool) and bool not in _tuple(kind))
        if not ok:
            names = "/".join(t.__name__ for t in _tuple(kind))
            raise self.err(k, f"expected {names}, got {v!r}")
        if check is not None and not check(v):
            raise self.err(k, f"expected {what}, got {v!r}")
        return v

    def table(self, k: str, required: bool = True) -> _Table:
        self.seen.add(k)
        if k not in self.data and not required:
            return _Table({}, self._key(k), self.origin)
        if k not in self.data:
            raise self.err(k, "missing table (required)")
        return _Table(self.data[k], self._key(k), self.origin)

    def free(self, k: str) -> Mapping[str, Any]:
        """An options table passed as keyword arguments (not checked here)."""
        t = self.table(k, required=False)
        return MappingProxyType(dict(t.data))

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise self.err(extra[0], "unknown key (typo?)")


def _tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


_POS = (lambda v: v > 0, "a positive number")
_NUM = (int, float)


def config_from_dict(data: Mapping[str, Any], base: Path, origin: str = "<config>") -> CycleConfig:
    """Build and validate a :class:`CycleConfig`; relative paths resolve against
    ``base``. Raises :class:`InputError` naming ``origin`` and the key."""
    top = _Table(dict(data), "", origin)

    def path(t: _Table, k: str) -> Path:
        p = Path(t.get(k, str, check=bool, what="a non-empty path"))
        return (p if p.is_absolute() else base / p).resolve()

    start_text = top.get("start", (str, datetime))
    try:
        start = parse_cycle_time(
            start_text.isoformat() if isinstance(start_text, datetime) else start_text
        )
    except InputError as exc:
        raise top.err("start", str(exc)) from None
    interval = float(top.get("interval_hours", _NUM, check=_POS[0], what=_POS[1]))
    steps = top.get("steps_per_cycle", int, check=_POS[0], what="a positive integer")
    fc_hours = float(
        top.get("forecast_hours", _NUM, 0, check=lambda v: v >= 0, what="a number >= 0")
    )
    n_fc = fc_hours * steps / interval
    if abs(n_fc - round(n_fc)) > 1e-9:
        raise top.err(
            "forecast_hours",
            f"expected a multiple of the step "
            f"interval_hours/steps_per_cycle = {interval / steps:g} h, got {fc_hours:g}",
        )
    members = top.get("members", int, check=lambda v: v >= 2, what="an integer >= 2")
    seed = top.get("seed", int, check=lambda v: v >= 0, what="an integer >= 0")
    retention = top.get("retention", int, check=lambda v: v >= 1, what="an integer >= 1")
    output = path(top, "output")
    threads = top.get("threads", int, 1, check=lambda v: v >= 1, what="an integer >= 1")
    device = top.get("device", str, "cpu")
    quicklook = top.get("quicklook", bool, True)

    w = top.table("world")
    world = WorldSpec(
        w.get("source", str, check=bool, what="physical:<name> or a path"),
        w.free("options"),
        w.get("units", str, None),
    )
    if world.physical is None:
        p = Path(world.source)
        world = WorldSpec(str(p if p.is_absolute() else base / p), world.options, world.units)
    w.done()

    m = top.table("method")
    method = MethodSpec(m.get("name", str, check=bool, what="a method name"), m.free("options"))
    m.done()

    o = top.table("observations")
    pattern = o.get(
        "pattern",
        str,
        check=lambda v: "{cycle" in v,
        what="a pattern containing {cycle:...}, e.g. 'obs_{cycle:%Y%m%dT%H}.nc'",
    )
    try:
        pattern.format(cycle=start)
    except (KeyError, IndexError, ValueError) as exc:
        raise o.err("pattern", f"cannot be formatted with the cycle time ({exc})") from None
    obs = ObservationSpec(
        inbox=path(o, "inbox"),
        pattern=pattern,
        variable=o.get("variable", str, check=bool, what="a variable name"),
        units=o.get("units", str),
        operator=o.get("operator", str, "identity"),
        sigma=float(o.get("sigma", _NUM, 1.0, check=_POS[0], what=_POS[1])),
    )
    o.done()

    c = top.table("cold_start", required=False)
    cold = ColdStartSpec(
        enabled=c.get("enabled", bool, True),
        mean=float(c.get("mean", _NUM, 0.0)),
        std=float(c.get("std", _NUM, 1.0, check=lambda v: v >= 0, what="a number >= 0")),
        spinup_steps=c.get("spinup_steps", int, 0, check=lambda v: v >= 0, what="an integer >= 0"),
    )
    c.done()
    top.done()
    return CycleConfig(
        start=start,
        interval_hours=interval,
        steps_per_cycle=steps,
        forecast_hours=fc_hours,
        members=members,
        seed=seed,
        retention=retention,
        output=output,
        world=world,
        method=method,
        observations=obs,
        cold_start=cold,
        threads=threads,
        device=device,
        quicklook=quicklook,
        source=Path(origin) if origin != "<config>" else None,
    )


def load_config(path: str | Path) -> CycleConfig:
    """Read and validate a cycle configuration from a TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(data, path.resolve().parent, str(path))
