"""Speed of the diffusion particle filter on L96-std (one thread), and its profile.

``python experiments/speed_dpf.py --steps 1 2 5 --cycles 150`` prints, per number of
diffusion steps, cycles/s of the local dpf (N=64, radius 3, q=0.15) and the global dpf
(N=64, q=0.5) with the shipped learned world, the denoiser calls per cycle and the time of
one denoiser call on 64 particles; ``--profile`` adds a cProfile table. Results go to
``experiments/results/speed_dpf.{md,json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiments.bench_dpf as B  # noqa: E402


def denoiser_ms(n: int = 64, reps: int = 30) -> float:
    import models

    w = models.load(str(B.CKPTS["l96"]), device="cpu").eval()
    ch = w.transition_sampler(torch.randn(n, 40))
    z = torch.randn(n, 40)
    with torch.no_grad():
        for _ in range(3):
            w.denoiser(z, ch.times[0], ch.cond)
        t = time.perf_counter()
        for _ in range(reps):
            w.denoiser(z, ch.times[0], ch.cond)
    return (time.perf_counter() - t) / reps * 1e3


def count_calls(fn):
    from models.diffusion.denoisers import Denoiser

    calls, orig = [0], Denoiser.forward

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)

    Denoiser.forward = counted
    try:
        out = fn()
    finally:
        Denoiser.forward = orig
    return out, calls[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5])
    p.add_argument("--cycles", type=int, default=150)
    p.add_argument("--methods", nargs="+", default=["ldpf", "dpf"])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    ms = denoiser_ms()
    for steps in args.steps:
        for method in args.methods:
            a = argparse.Namespace(
                q=None, cycles=args.cycles, burn=args.cycles // 4, world="learned",
                steps=steps, radius=3.0, twist="gaussian", inner=0.5, letkf_infl=1.05,
                letkf_radius=3.0, etkf_infl=1.02, progress=0,
            )  # fmt: skip
            prof = cProfile.Profile() if args.profile else None
            if prof:
                prof.enable()
            r, calls = count_calls(lambda: B.run_one("l96-std", method, 64, 0, a))  # noqa: B023
            if prof:
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
                print(s.getvalue())
            rows.append(
                dict(method=method, steps=steps, n=64, cycles=r["cycles"],
                     cycles_per_s=r["cycles_per_s"], calls_per_cycle=calls / r["cycles"],
                     rmse_a=r["rmse_a"], denoiser_ms_64=ms, load=os.getloadavg()[0])
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"denoiser call on 64 particles: {ms:.1f} ms (1 thread); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| method | diffusion steps | N | cycles | cycles/s | denoiser calls/cycle "
        "| rmse.a (short) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | 64 | {r['cycles']} | {r['cycles_per_s']:.1f} "
            f"| {r['calls_per_cycle']:.2f} | {r['rmse_a']:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    out = ROOT / "experiments" / "results" / "speed_dpf"
    for suffix, body in ((".md", text + "\n"), (".json", json.dumps(rows, indent=1))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, out.with_suffix(suffix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
