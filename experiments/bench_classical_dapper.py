"""Side-by-side with DAPPER 1.7.1 on the *same* truth and observations (BENCHMARKS.md A).

DAPPER must live in a separate virtual environment (it pins old dependencies):

    python -m venv /tmp/dapper-venv && /tmp/dapper-venv/bin/pip install dapper
    python experiments/bench_classical_dapper.py --dapper-python /tmp/dapper-venv/bin/python

For each case the truth and observations of seed 0 are simulated here (as in
``bench_classical.py``), written to a temporary ``.npz``, assimilated by our filter and
then by DAPPER's (driven with ``xp.assimilate(HMM, xx, yy)``, progress bar and live
plots off). Both run one after the other on one thread; DAPPER's time includes its
per-cycle statistics, which are part of its loop. Writes
``experiments/results/classical_dapper.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assim.metrics import rmse_a  # noqa: E402
from experiments.bench_classical import (  # noqa: E402
    RESULTS,
    SETTINGS,
    Method,
    run_filter,
    simulate,
    write_atomic,
)

_LOC4 = {"inflation": 1.04, "radius": 4.0}
_LOC3 = {"inflation": 1.05, "radius": 3.0}
# (setting, our method, DAPPER constructor expression)
CASES = [
    ("L96-std", Method("ETKF N=40 infl 1.02", "etkf", 40, {"inflation": 1.02}),
     'da.EnKF("Sqrt", N=40, infl=1.02)'),
    ("L96-std", Method("LETKF N=7 loc 4 infl 1.04", "letkf", 7, _LOC4),
     "da.LETKF(N=7, infl=1.04, loc_rad=4, rot=True)"),
    ("L96-sparse", Method("LETKF N=40 loc 3 infl 1.05", "letkf", 40, _LOC3),
     "da.LETKF(N=40, infl=1.05, loc_rad=3)"),
]  # fmt: skip

DRIVER = """
import json, sys, time, numpy as np
import dapper.mods as modelling, dapper.da_methods as da
import dapper.tools.progressbar as pb
from dapper.mods.Lorenz96 import step, x0
from dapper.tools.localization import nd_Id_localization
pb.disable_progbar = True
path, every, expr, burn = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
d = np.load(path); truth, ys = d["truth"], d["ys"]; K = truth.shape[0]; nx = 40
jj = np.arange(0, nx, every)
obs = modelling.partial_Id_Obs(nx, jj); obs["noise"] = 1
obs["localizer"] = nd_Id_localization((nx,), (2,), jj)
hmm = modelling.HiddenMarkovModel({"M": nx, "model": step, "noise": 0}, obs,
    modelling.Chronology(0.05, dko=1, Ko=K - 1, BurnIn=burn * 0.05),
    modelling.GaussRV(mu=x0(nx), C=0.001))
xp = eval(expr); np.random.seed(1)
t0 = time.perf_counter(); xp.assimilate(hmm, np.vstack([x0(nx)[None], truth]), ys, liveplots=False)
wall = time.perf_counter() - t0
xp.stats.average_in_time()
print(json.dumps({"rmse_a": float(xp.avrgs.err.rms.a.val), "cycles_per_s": K / wall}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dapper-python", required=True, help="python of a venv with dapper")
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--burn-in", type=int, default=500)
    args = p.parse_args(argv)
    if not Path(args.dapper_python).exists():
        p.error(f"--dapper-python: {args.dapper_python} does not exist")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.py"
        driver.write_text(DRIVER)
        for sid, m, expr in CASES:
            s = SETTINGS[sid]
            truth, ys = simulate(s, 0, args.cycles)
            data = Path(tmp) / f"{sid}.npz"
            np.savez(data, truth=truth.numpy(), ys=ys.numpy())
            means, wall = run_filter(m, s, truth, ys, 0)
            ours = rmse_a(torch.as_tensor(means), truth, burn_in=args.burn_in)
            every = 4 if s.obs == "every4" else 1
            cmd = [args.dapper_python, str(driver), str(data), str(every), expr, str(args.burn_in)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            dp = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((sid, m.label, ours, args.cycles / wall, dp["rmse_a"], dp["cycles_per_s"]))
            print(rows[-1], flush=True)
    md = (
        "# Ours vs DAPPER 1.7.1, same truth and observations (seed 0)\n\n"
        f"{args.cycles} cycles, burn-in {args.burn_in}; one thread each, run one after the "
        "other on the shared 2-core machine (absolute speeds depend on its load).\n\n"
        "| setting | method | rmse.a ours | rmse.a DAPPER | cycles/s ours | cycles/s DAPPER |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {a} | {b} | {c:.4g} | {e:.4g} | {d:.0f} | {f:.0f} |\n" for a, b, c, d, e, f in rows
        )
    )
    print(md)
    write_atomic(RESULTS / "classical_dapper.md", md.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
