"""Local diffusion particle filter on L96-std with each shipped Lorenz-96 world.

Issue #8: ``rmse.a`` of the localised dpf (N = 64, radius 3, model error ``q``) with the
conditional world (``l96``, ``--steps`` diffusion steps), DYffusion (``l96_dyffusion``),
Rolling (``l96_rolling``) and FunctionSpace (``l96_function_space``, ``--steps``
steps). L96-std observes every data step (0.05 MTU), so:

* DYffusion runs as :class:`~models.worlds.dyffusion.DYffusionDataStep`: the first lead
  of its cold-sampling chain (one Gaussian kernel per data step, variance calibrated at
  training, plus ``q^2``); its own world step covers 4 data steps (0.2 MTU).
* Rolling runs its Markov chain (initialisation phase + one rolling phase:
  ``init_steps + shift_steps`` = 10 kernels per step, fixed by the checkpoint), ``q``
  added to the last kernel (:meth:`Rolling.configure`). Its chain carries the hidden
  window frames per particle; the filters reindex them after inner resampling, global
  ``(N,)`` or per location ``(D, N)`` ancestors (``RollingChain.reindex``). Variants:
  ``l96_rolling:noinner`` (inner resampling off) and ``l96_rolling:global`` (global dpf,
  ``q = 0.5`` as bench_dpf's global default).

Everything else (truth, observations, DAPPER's ``X0``, burn-in, metrics, divergence)
is ``experiments/bench_dpf.py``'s :func:`run_one` with ``--ckpt`` set to each world
(it wraps a DYffusion checkpoint in ``DYffusionDataStep``).

Usage: ``python experiments/bench_dpf_worlds.py --cycles 500 --seeds 0 [--tag _pilot]``
Results: ``experiments/results/bench_dpf_worlds_l96{tag}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import bench_dpf  # noqa: E402

WORLDS = ("l96", "l96_dyffusion", "l96_rolling", "l96_function_space", "l96_rolling:global",
          "l96_rolling:noinner")  # fmt: skip
RESULTS = ROOT / "experiments" / "results"


class _Args(argparse.Namespace):
    """``bench_dpf.run_one``'s options; an option this driver does not set is ``None``
    (the dpf factory ignores ``None``), so new options of bench_dpf keep their defaults."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def run(name: str, seed: int, a: argparse.Namespace) -> dict:
    conditional = name in ("l96", "l96_function_space")
    ckpt, _, mode = name.partition(":")
    args = _Args(
        world="learned", cycles=a.cycles, burn=a.burn, q=0.5 if mode == "global" else a.q,
        radius=a.radius, inner=0.0 if mode == "noinner" else a.inner, twist="gaussian",
        progress=a.progress, steps=a.steps if conditional else None,
    )  # fmt: skip
    args.ckpt = ckpt
    method = "dpf" if mode == "global" else "ldpf"
    row = bench_dpf.run_one("l96-std", method, a.n, seed, args)
    row["world"] = name
    row["inner"] = args.inner
    row["steps"] = a.steps if conditional else {"l96_dyffusion": 1, "l96_rolling": 10}[ckpt]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| world | filter | inner resampling | kernels/step | q | N | seeds x cycles "
        "| rmse.a median [min, max] | spread/skill | mean ESS | diverged | cycles/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [w for w in WORLDS if any(r["world"] == w for r in rows)]:
        rs = [r for r in rows if r["world"] == name]
        v = [r["rmse_a"] for r in rs]
        lines.append(
            f"| {name} | {rs[0]['method']} | {rs[0]['inner']:g} | {rs[0]['steps']} "
            f"| {rs[0]['q']:g} | {rs[0]['n']} | {len(rs)} x {rs[0]['cycles']} "
            f"| {median(v):.3f} [{min(v):.3f}, {max(v):.3f}] "
            f"| {median(r['spread_skill'] for r in rs):.2f} "
            f"| {median(r['mean_ess'] for r in rs):.1f} | {sum(r['diverged'] for r in rs)} "
            f"| {median(r['cycles_per_s'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", nargs="+", default=list(WORLDS[:4]), choices=WORLDS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--cycles", type=int, default=500)
    p.add_argument("--burn", type=int, default=100)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--q", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=2, help="diffusion steps (conditional kinds)")
    p.add_argument("--radius", type=float, default=3.0)
    p.add_argument("--inner", type=float, default=0.5)
    p.add_argument("--progress", type=int, default=0)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.burn = min(a.burn, a.cycles // 4)
    stem = RESULTS / f"bench_dpf_worlds_l96{a.tag}"
    rows = []
    partial = stem.with_suffix(".partial.jsonl")
    partial.write_text("")
    for seed in a.seeds:
        for name in a.worlds:
            rows.append(run(name, seed, a))
            r = rows[-1]
            print(f"{name} seed {seed}: rmse.a {r['rmse_a']:.3f} ({r['cycles_per_s']:.1f} cyc/s)",
                  flush=True)  # fmt: skip
            with partial.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
    head = (
        f"# bench_dpf_worlds_l96{a.tag}\n\n`python experiments/bench_dpf_worlds.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}` — L96-std, local dpf "
        f"(radius {a.radius:g}, Gaussian twist), burn-in {a.burn} cycles, torch threads 1. "
        "Floor (BENCHMARKS B, learned world): 0.34.\n\n"
    )
    text = head + table(rows) + "\n"
    for suffix, body in ((".md", text), (".json", json.dumps(rows, indent=1))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, stem.with_suffix(suffix))
    partial.unlink()
    print(text)
    return 0 if all(math.isfinite(r["rmse_a"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
