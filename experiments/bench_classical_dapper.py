"""Side-by-side with DAPPER 1.7.1 on the *same* truth and observations (BENCHMARKS.md A).

DAPPER must live in a separate virtual environment (it pins old dependencies):

    python -m venv /tmp/dapper-venv && /tmp/dapper-venv/bin/pip install dapper
    python experiments/bench_classical_dapper.py --dapper-python /tmp/dapper-venv/bin/python
    python experiments/bench_classical_dapper.py --dapper-python ... --cases L63 --seeds 0 1 2
    python experiments/bench_classical_dapper.py --dapper-python ... --cases "L96-std PF" --own

For each case and seed the truth and observations are simulated here (exactly as
``bench_classical.py``: same seeds, so the same truths as its table), written to a
temporary ``.npz`` (the full model-step trajectory, which DAPPER's statistics need,
and the observations), assimilated by our filter and then by DAPPER's (driven with
``xp.assimilate(HMM, xx, yy)``, DAPPER's RNG seeded with ``seed + 1``, progress bar and
live plots off). ``--own`` instead runs DAPPER's whole pipeline (``HMM.simulate()``
truth from its own ``X0``, seeded) and no filter of ours. Both run one after the other
on one thread; DAPPER's time includes its per-cycle statistics, part of its loop.
Writes ``experiments/results/classical_dapper{_TAG}.md``.
"""

from __future__ import annotations

import argparse
import json
import math
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
    _pf,
    run_filter,
    simulate,
    write_atomic,
    x0_mean_var,
)
from models.worlds.physical import physical_world  # noqa: E402

_LOC4 = {"inflation": 1.04, "radius": 4.0}
_LOC3 = {"inflation": 1.05, "radius": 3.0}
# (setting, our method, DAPPER constructor expression)
CASES = [
    ("L96-std", Method("ETKF N=40 infl 1.02", "etkf", 40, {"inflation": 1.02}),
     'da.EnKF("Sqrt", N=40, infl=1.02)'),
    ("L96-std", Method("LETKF N=7 loc 4 infl 1.04", "letkf", 7, _LOC4),
     "da.LETKF(N=7, infl=1.04, loc_rad=4, rot=True)"),
    ("L96-std", _pf(3000, 0.7, 0.5, 40, "0.249"), "da.PartFilt(N=3000, reg=0.7, NER=0.5)"),
    ("L96-std", _pf(3000, 0.6, 0.5, 40, "0.249"), "da.PartFilt(N=3000, reg=0.6, NER=0.5)"),
    ("L96-std", _pf(3000, 0.65, 0.5, 40, "0.249"), "da.PartFilt(N=3000, reg=0.65, NER=0.5)"),
    ("L96-sparse", Method("ETKF N=40 infl 1.10", "etkf", 40, {"inflation": 1.10}),
     'da.EnKF("Sqrt", N=40, infl=1.10)'),
    ("L96-sparse", Method("LETKF N=40 loc 3 infl 1.05", "letkf", 40, _LOC3),
     "da.LETKF(N=40, infl=1.05, loc_rad=3)"),
    ("L63-std", Method("EnKF PertObs N=10 infl 1.04", "enkf", 10, {"inflation": 1.04}),
     'da.EnKF("PertObs", N=10, infl=1.04)'),
    ("L63-std", Method("ETKF N=10 infl 1.02 rot", "etkf", 10,
                       {"inflation": 1.02, "rotate": True}),
     'da.EnKF("Sqrt", N=10, infl=1.02, rot=True)'),
    ("L63-std", Method("EnKF-N N=10 rot", "enkf-n", 10, {"rotate": True}),
     "da.EnKF_N(N=10, rot=True)"),
    ("L63-std", _pf(100, 2.4, 0.3, 3, "0.38"), "da.PartFilt(N=100, reg=2.4, NER=0.3)"),
    ("L63-cubic", Method("ETKF N=10 infl 1.02", "etkf", 10, {"inflation": 1.02}),
     'da.EnKF("Sqrt", N=10, infl=1.02)'),
    ("L63-cubic", Method("EnKF PertObs N=10 infl 1.04", "enkf", 10, {"inflation": 1.04}),
     'da.EnKF("PertObs", N=10, infl=1.04)'),
    ("L63-cubic", Method("EnKF-N N=10 rot", "enkf-n", 10, {"rotate": True}),
     "da.EnKF_N(N=10, rot=True)"),
    ("L63-cubic", _pf(1000, 0.7, 0.3, 3, ""), "da.PartFilt(N=1000, reg=0.7, NER=0.3)"),
]  # fmt: skip

DRIVER = """
import json, sys, time, numpy as np
import dapper.mods as modelling, dapper.da_methods as da
import dapper.tools.progressbar as pb
from dapper.tools.seeding import set_seed
from dapper.tools.localization import nd_Id_localization
pb.disable_progbar = True
spec = json.loads(sys.argv[1])
if spec["system"] == "l96":
    from dapper.mods.Lorenz96 import step
    nx, dt = 40, 0.05
else:
    from dapper.mods.Lorenz63 import step
    nx, dt = 3, 0.01
mu0 = np.array(spec["x0_mean"])
K, dko, burn = spec["cycles"], spec["dko"], spec["burn_in"]
jj = np.arange(0, nx, spec["every"])
if spec["cubic"]:
    obs = {"M": nx, "model": lambda x: x**3, "linear": lambda x: np.diag(3 * x**2)}
else:
    obs = modelling.partial_Id_Obs(nx, jj)
obs["noise"] = spec["sigma2"]
if spec["system"] == "l96":
    obs["localizer"] = nd_Id_localization((nx,), (2,), jj)
hmm = modelling.HiddenMarkovModel({"M": nx, "model": step, "noise": 0}, obs,
    modelling.Chronology(dt, dko=dko, Ko=K - 1, BurnIn=burn * dko * dt),
    modelling.GaussRV(mu=mu0, C=spec["x0_var"]))
set_seed(spec["seed"] + 1)
if spec["data"]:
    d = np.load(spec["data"]); xx, yy = d["xx"], d["ys"]
else:
    xx, yy = hmm.simulate()
xp = eval(spec["expr"])
t0 = time.perf_counter(); xp.assimilate(hmm, xx, yy, liveplots=False)
wall = time.perf_counter() - t0
xp.stats.average_in_time()
print(json.dumps({"rmse_a": float(xp.avrgs.err.rms.a.val), "cycles_per_s": K / wall}))
"""


def full_truth(sid: str, seed: int, cycles: int) -> np.ndarray:
    """The truth of ``bench_classical.simulate`` at every model step ``(cycles*dko+1, d)``
    (same initial draw, same integrator)."""
    s = SETTINGS[sid]
    world = physical_world(s.system)
    mu, var = x0_mean_var(s.system)
    g = torch.Generator().manual_seed(10_000 + seed)
    x = (mu + math.sqrt(var) * torch.randn(mu.shape, generator=g, dtype=torch.float64)).unsqueeze(0)
    out = [x[0].numpy().copy()]
    for _ in range(cycles * s.dko):
        x = world.step(x)
        out.append(x[0].numpy().copy())
    return np.stack(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dapper-python", required=True, help="python of a venv with dapper")
    p.add_argument("--cases", nargs="*", default=None, help="substrings of 'setting method'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cycles", type=int, default=None, help="default: the setting's")
    p.add_argument("--burn-in", type=int, default=None, help="default: the setting's")
    p.add_argument("--own", action="store_true", help="DAPPER's own truth; no filter of ours")
    p.add_argument("--tag", default="", help="suffix of the output file")
    args = p.parse_args(argv)
    if not Path(args.dapper_python).exists():
        p.error(f"--dapper-python: {args.dapper_python} does not exist")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cases = [
        c for c in CASES if not args.cases or any(q in f"{c[0]} {c[1].label}" for q in args.cases)
    ]
    if not cases:
        p.error(f"--cases {args.cases} matches none of {[f'{c[0]} {c[1].label}' for c in CASES]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "driver.py"
        driver.write_text(DRIVER)
        for sid, m, expr in cases:
            s = SETTINGS[sid]
            k = args.cycles or s.cycles
            burn = s.burn_in if args.burn_in is None else args.burn_in
            mu, var = x0_mean_var(s.system)
            for seed in args.seeds:
                spec = {
                    "system": s.system,
                    "every": 4 if s.obs == "every4" else 1,
                    "cubic": s.obs == "cubic",
                    "sigma2": s.sigma2,
                    "dko": s.dko,
                    "cycles": k,
                    "burn_in": burn,
                    "x0_mean": mu.tolist(),
                    "x0_var": var,
                    "seed": seed,
                    "expr": expr,
                    "data": None,
                }
                ours, ours_speed = math.nan, math.nan
                if not args.own:
                    truth, ys = simulate(s, seed, k)
                    xx = full_truth(sid, seed, k)
                    if not np.allclose(xx[s.dko :: s.dko], truth.numpy(), rtol=0, atol=1e-10):
                        raise RuntimeError("full-step truth differs from bench_classical's")
                    data = Path(tmp) / f"{sid}_{seed}.npz"
                    np.savez(data, xx=xx, ys=ys.numpy())
                    spec["data"] = str(data)
                    means, wall = run_filter(m, s, truth, ys, seed)
                    ok = np.isfinite(means).all()
                    ours = rmse_a(torch.as_tensor(means), truth, burn_in=burn) if ok else math.inf
                    ours_speed = k / wall
                cmd = [args.dapper_python, str(driver), json.dumps(spec)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    dp = {"rmse_a": math.nan, "cycles_per_s": math.nan}
                    print(out.stderr[-2000:], file=sys.stderr)
                else:
                    dp = json.loads(out.stdout.strip().splitlines()[-1])
                dp_row = (dp["rmse_a"], dp["cycles_per_s"])
                rows.append((sid, m.label, expr, seed, k, ours, ours_speed, *dp_row))
                print(rows[-1], flush=True)
    what = "DAPPER's own pipeline (its HMM.simulate truth)" if args.own else "same truth and obs"
    md = (
        f"# Ours vs DAPPER 1.7.1, {what}\n\n"
        "One thread each, run one after the other on the shared 2-core machine (absolute "
        "speeds depend on its load); seeds as bench_classical.py.\n\n"
        "| setting | ours | DAPPER | seed | cycles | rmse.a ours | rmse.a DAPPER | "
        "cycles/s ours | cycles/s DAPPER |\n|---|---|---|---|---|---|---|---|---|\n"
        + "".join(
            f"| {a} | {b} | `{c}` | {d} | {e} | {f:.4g} | {h:.4g} | {g:.0f} | {i:.0f} |\n"
            for a, b, c, d, e, f, g, h, i in rows
        )
    )
    print(md)
    write_atomic(RESULTS / f"classical_dapper{'_' + args.tag if args.tag else ''}.md", md.encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
