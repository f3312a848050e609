"""Crash safety and concurrency of the nightly cycle, with real processes.

Crash safety: a cycle runs in a child process that is SIGKILLed at 20 random
(seeded) moments of its run. After each kill every visible cycle folder is complete
(its record exists and lists exactly the files present, with matching sha256), and a
rerun completes with netCDF/restart/PNG bytes identical to an uninterrupted run.
The children are forked by a small runner process that has already imported torch
& co (and run no torch op, so forking is safe): a run then takes a fraction of a
second and the kill moments cover the real work (reading, filtering, writing,
renaming, pruning) rather than interpreter start-up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assim.cycle import catch_up
from assim.cycle_files import sha256
from tests.assim.test_cycle_helpers import T0, fill_inbox, write_config

NAME = re.compile(r"^\d{8}T\d{2}$")
REPO = Path(__file__).resolve().parents[2]

# runs a warm-up cycle, then reads one JSON argv per line, forks a child running
# `assim <argv>`, prints the child's PID, waits for it and prints its exit code
# (-9 when SIGKILLed)
RUNNER = """
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import assim.cli, assim.commands.cycle, assim.cycle, assim.cycle_files
import assim.filters.enkf, models.worlds.physical
import torch
torch.set_num_threads(1)  # no OpenMP pool before fork
assim.cli.main(json.loads(sys.argv[1]))  # warm-up: first-use costs paid once, here
print("ready", flush=True)
for line in sys.stdin:
    argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            code = assim.cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code = 1
        os._exit(int(code or 0))
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _env() -> dict[str, str]:
    extra = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(extra)}


def _check_visible(out: Path) -> list[str]:
    """Every cycle folder in sight is complete and intact; returns their names."""
    names = []
    for p in sorted(out.iterdir()):
        if p.name in (".lock", "cycle.log") or p.name.startswith((".tmp-", ".trash-")):
            continue
        assert NAME.match(p.name) and p.is_dir(), p
        rec = json.loads((p / "record.json").read_text())
        assert rec["status"] == "ok"
        assert sorted(f.name for f in p.iterdir()) == sorted([*rec["outputs"], "record.json"])
        for name, digest in rec["outputs"].items():
            assert sha256(p / name) == digest, f"half-written {p / name}"
        names.append(p.name)
    return names


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_no_partial_output(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    path, cfg = write_config(template, quicklook=True, retention=1)
    fill_inbox(cfg, 2)
    catch_up(cfg, T0)  # cycle 1 complete; cycle 2 reads its restart, then prunes it
    argv = ["cycle", "--config", str(path), "--cycle", "2026-11-02T00"]

    def fresh(name: str) -> tuple[Path, list[str]]:
        root = tmp_path / name
        shutil.copytree(template, root)
        return root / "out", [*argv[:2], str(root / "cycle.toml"), *argv[3:]]

    warm = json.dumps(fresh("warmup")[1])
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, warm],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    assert runner.stdout.readline().strip() == "ready"

    def run_child(args: list[str], kill_after: float | None = None) -> tuple[int, float]:
        runner.stdin.write(json.dumps(args) + "\n")
        runner.stdin.flush()
        pid = int(runner.stdout.readline())
        tick = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already finished and reaped
                pass
        rc = int(runner.stdout.readline())
        return rc, time.perf_counter() - tick

    ref_out, ref_args = fresh("reference")
    rc, duration = run_child(ref_args)
    print(f"uninterrupted cycle: {duration:.3f} s")
    assert rc == 0 and _check_visible(ref_out) == ["20261102T00"]
    ref = {
        f.name: f.read_bytes()
        for f in (ref_out / "20261102T00").iterdir()
        if f.suffix in (".nc", ".png")
    }
    assert sorted(ref) == ["analysis.nc", "forecast.nc", "quicklook.png", "restart.nc"]

    rng = random.Random(20261126)
    interrupted = 0
    for i in range(20):
        out, args = fresh(f"kill{i}")
        rc, _ = run_child(args, kill_after=rng.uniform(0.0, duration))
        assert rc in (0, -signal.SIGKILL)
        interrupted += rc == -signal.SIGKILL
        visible = _check_visible(out)
        assert visible in (["20261101T00"], ["20261101T00", "20261102T00"], ["20261102T00"])
        rc, _ = run_child(args)
        assert rc == 0
        assert _check_visible(out) == ["20261102T00"]
        assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        for name, data in ref.items():
            assert (out / "20261102T00" / name).read_bytes() == data, (i, name)
    runner.stdin.close()
    runner.wait(60)
    assert interrupted >= 5  # most kills must land inside the run, or the test is moot


def test_two_concurrent_runs_exactly_one_runs(tmp_path):
    path, cfg = write_config(tmp_path)
    fill_inbox(cfg, 4)
    cmd = [
        sys.executable,
        "-m",
        "assim.cli",
        "cycle",
        "--config",
        str(path),
        "--catch-up",
        "--until",
        "2026-11-04T00",
    ]
    procs = [
        subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 75], (rcs, errs)
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    assert f"held by process {procs[winner].pid}" in errs[loser]
    for k in range(4):
        rec = json.loads((cfg.output / f"2026110{k + 1}T00" / "record.json").read_text())
        assert rec["pid"] == procs[winner].pid
    log = (cfg.output / "cycle.log").read_text()
    assert log.count(": done") == 4 and f"ERROR [pid {procs[loser].pid}]" in log
