"""Cycle folders on disk: the run lock, completeness, leftovers, retention, seeds.

Layout of the output folder ``out/``::

    out/.lock                  flock target; holds the PID of the running cycle
    out/cycle.log              appended by every run
    out/20261126T00/           one complete cycle (``record.json`` written last)
    out/.tmp-<name>-<pid>/     a cycle being written (renamed into place when done)
    out/.trash-<name>-<pid>/   a cycle being deleted (renamed out of place first)

A folder under a cycle name appears only through ``os.rename`` of a finished
temporary folder, so it is complete; ``.tmp-*`` / ``.trash-*`` leftovers of a killed
run are removed by the next run while it holds the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

from assim.cycle_config import cycle_name

__all__ = [
    "RECORD",
    "CycleLock",
    "LockBusy",
    "clean_leftovers",
    "complete_cycles",
    "cycle_seed",
    "discard",
    "is_complete",
    "prune",
]

log = logging.getLogger("assim.cycle")

RECORD = "record.json"
_NAME_RE = re.compile(r"^\d{8}T\d{2}(\d{4})?$")


class LockBusy(RuntimeError):
    """Another run holds ``out/.lock`` (exit 75)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is held by {who}; another cycle run is in progress")
        self.pid = pid


# ---------------------------------------------------------------------------------------
# lock, folders


class CycleLock:
    """Non-blocking exclusive ``flock`` on ``out/.lock``; the holder writes its PID into
    the file. The kernel drops the lock when the holder dies, so a killed run never
    blocks the next one (the stale PID in the file is simply overwritten)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> CycleLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = None
            for _ in range(50):  # the holder writes its PID right after locking
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if text.isdigit():
                    pid = int(text)
                    break
                time.sleep(0.02)
            os.close(fd)
            raise LockBusy(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def is_complete(folder: Path) -> bool:
    """A cycle folder is complete when its record (written last) parses."""
    try:
        with open(Path(folder) / RECORD, encoding="utf-8") as fh:
            return json.load(fh).get("status") == "ok"
    except (OSError, ValueError):
        return False


def complete_cycles(out: Path) -> list[datetime]:
    """Times of the complete cycle folders in ``out``, oldest first."""
    if not Path(out).is_dir():
        return []
    names = sorted(p.name for p in Path(out).iterdir() if _NAME_RE.match(p.name))
    return [_name_time(n) for n in names if is_complete(Path(out) / n)]


def _name_time(name: str) -> datetime:
    return datetime.strptime(name, "%Y%m%dT%H%M%S" if len(name) > 11 else "%Y%m%dT%H")


def clean_leftovers(out: Path) -> list[str]:
    """Remove temporary and trash folders of killed runs. Call under the lock only."""
    removed = []
    for p in sorted(Path(out).iterdir()):
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.warning("removed leftovers of an interrupted run: %s", ", ".join(removed))
    return removed


def discard(folder: Path) -> None:
    """Remove a folder so that it never looks complete mid-way: rename, then delete."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash)


def prune(out: Path, retention: int) -> list[str]:
    """Keep the ``retention`` newest complete cycle folders; discard the older ones."""
    names = [cycle_name(t) for t in complete_cycles(out)]
    old = names[: max(0, len(names) - retention)]
    for n in old:
        discard(Path(out) / n)
    if old:
        log.info("retention %d: pruned %s", retention, ", ".join(old))
    return old


def cycle_seed(seed: int, t: datetime) -> int:
    """Seed of cycle ``t``: the first 63 bits of ``sha256("<seed>:<ISO time>")``."""
    digest = hashlib.sha256(f"{seed}:{t:%Y-%m-%dT%H:%M:%S}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
