"""Wall time per nightly cycle and peak memory (BENCHMARKS.md; issue "Nightly cycle").

Configurations (each runs in a fresh subprocess, so that the peak RSS is its own):

- ``l96-etkf``: the demo cycle -- Lorenz-96, 40 variables, ETKF N=40, 4 steps per
  cycle observed (identity, sigma 1), 8-step forecast, CF files + PNG + record.
- ``l96-letkf``: as above with LETKF N=20 (radius 4).
- ``l96-dpf``: the diffusion particle filter (N=64, local, radius 3) on the shipped
  learned L96 world ``models/checkpoints/l96.pt`` (skipped when it is absent).
- ``kolmogorov64-letkf``: 2-D Kolmogorov flow 64^2 (physical world), LETKF N=20
  (radius 6, RTPS 0.7), every 4th grid point observed (256 values, sigma 0.1), 4
  steps (0.2 time units each) per cycle, 8-step forecast. (Global ETKF with N=20
  cannot fit 256 observations of a 4096-dim state and diverges until its eigh fails,
  so the 2-D benchmark uses the local filter; these settings are for timing, not
  tuned for skill.)

Each run: synthetic observations for ``--cycles`` cycles from a truth run, then
the cycles one by one through :func:`assim.cycle.run_cycle` (the first one
cold-starts). Reported: median wall time of the warm cycles (and the cold first
one), the split read/assimilate/forecast/write from the run records, peak RSS
(``resource.getrusage``: torch tensors included) and the Python-heap peak of one
warm cycle (``tracemalloc``: Python objects only). One torch thread.

Usage: ``python experiments/bench_cycle.py [--cycles 6] [--only NAME ...] [--device cuda]``;
writes ``experiments/results/bench_cycle.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CKPT = ROOT / "models" / "checkpoints" / "l96.pt"

L96_OBS = {"variable": "x", "units": "1", "operator": "identity", "sigma": 1.0}
CONFIGS: dict[str, dict] = {
    "l96-etkf": {
        "members": 40,
        "method": {"name": "etkf", "options": {"inflation": 1.02}},
    },
    "l96-letkf": {
        "members": 20,
        "method": {"name": "letkf", "options": {"inflation": 1.02, "radius": 4.0}},
    },
    "l96-dpf": {
        "members": 64,
        "world": {"source": str(CKPT), "options": {}},
        "method": {"name": "dpf", "options": {"radius": 3.0}},
    },
    "kolmogorov64-letkf": {
        "members": 20,
        "world": {"source": "physical:kolmogorov", "options": {"n": 64}},
        "method": {"name": "letkf", "options": {"radius": 6.0, "rtps": 0.7}},
        "observations": {
            "variable": "vorticity",
            "units": "s-1",
            "operator": "every:4",
            "sigma": 0.1,
        },
        "cold_start": {"mean": 0.0, "std": 1.0, "spinup_steps": 25},
    },
}


def _config(name: str, folder: Path, device: str = "cpu"):
    from assim.cycle_demo import demo_config

    over = dict(CONFIGS[name])
    obs = {
        **L96_OBS,
        **over.pop("observations", {}),
        "inbox": "inbox",
        "pattern": "obs_{cycle:%Y%m%dT%H}.nc",
    }
    return demo_config(folder, observations=obs, retention=3, device=device, **over)


def run_one(name: str, n_cycles: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(1)
    from assim.cycle import build_components, run_cycle
    from assim.cycle_config import cycle_name
    from assim.cycle_demo import synthetic_inbox

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(name, Path(tmp), device)
        comp = build_components(cfg)
        gen = torch.Generator().manual_seed(0)
        x0 = cfg.cold_start.mean + cfg.cold_start.std * torch.randn(
            comp.world.state_shape, generator=gen, dtype=comp.dtype
        )
        for _ in range(max(100, cfg.cold_start.spinup_steps)):
            x0 = comp.world.step(x0.unsqueeze(0))[0]
        times = [cfg.start + k * cfg.interval for k in range(n_cycles)]
        synthetic_inbox(cfg, times, comp.world, comp.observation, x0, seed=1)
        walls, parts = [], []
        for i, t in enumerate(times):
            if i == n_cycles - 1:
                tracemalloc.start()
            tick = time.perf_counter()
            run_cycle(cfg, t, comp)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - tick)
            rec = json.loads((cfg.output / cycle_name(t) / "record.json").read_text())
            parts.append(rec["timings_s"])
        heap = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ess = rec["diagnostics"]["ess_min"]
    warm = walls[1:]
    return {
        "config": name,
        "method": cfg.method.name,
        "members": cfg.members,
        "state": "x".join(map(str, comp.world.state_shape)),
        "cycles": n_cycles,
        "cold_s": walls[0],
        "median_s": statistics.median(warm),
        "split_s": {k: statistics.median(p[k] for p in parts[1:]) for k in parts[1]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "py_heap_peak_mb": heap / 2**20,
        "ess_min_last": ess,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.cycles, a.device)))
        return
    rows = []
    for name in a.only:
        if name == "l96-dpf" and not CKPT.exists():
            print(f"{name}: skipped ({CKPT.relative_to(ROOT)} not found)", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--child", name, "--cycles", str(a.cycles)]
        cmd += ["--device", a.device]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['median_s']:.3f} s/cycle", file=sys.stderr)
    head = (
        "| config | method | N | state | cold cycle s | warm cycle s (median) | "
        "read / assim / forecast / write s | peak RSS MB | py heap MB |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        s = r["split_s"]
        split = " / ".join(
            f"{s[k]:.3f}" for k in ("read_s", "assimilate_s", "forecast_s", "write_s")
        )
        lines.append(
            f"| {r['config']} | {r['method']} | {r['members']} | {r['state']} | "
            f"{r['cold_s']:.3f} | {r['median_s']:.3f} | {split} | {r['peak_rss_mb']:.0f} | "
            f"{r['py_heap_peak_mb']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    note = (
        f"`python experiments/bench_cycle.py --cycles {a.cycles} --device {a.device}` "
        f"(1 torch thread, "
        f"2-core CPU shared with other jobs; {time.strftime('%Y-%m-%d', time.gmtime())})"
    )
    (RESULTS / "bench_cycle.md").write_text(f"# Nightly cycle benchmark\n\n{note}\n\n{table}\n")
    (RESULTS / "bench_cycle.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
