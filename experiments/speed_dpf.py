"""Speed of the diffusion particle filter on L96-std (one thread), and its profile.

``python experiments/speed_dpf.py --steps 1 2 5 --cycles 150`` prints, per number of
diffusion steps, cycles/s of the local dpf (N=64, radius 3, q=0.15) and the global dpf
(N=64, q=0.5) with the shipped learned world, the denoiser calls per cycle and the time of
one denoiser call on 64 particles; ``--profile`` adds a cProfile table; ``--network``
only times the backbone's fast path against its module path (``ResNet1d.forward`` vs
``forward_reference``) in one process.
``--baseline DIR`` (a copy of an older tree: ``DIR/assim``, ``DIR/models``,
``DIR/experiments``) measures that tree and this one (or ``--after DIR2``, e.g. the
baseline copy with only the changed files replaced, to isolate one change while others
edit the tree) side by side: ``--reps`` runs of each, alternating, every run in its own
process (1 thread), so both see the same load; the table gives the median cycles/s of
each, and the CPU ms of one denoiser call on 64 particles measured in each run's process
with its tree's code. ``cycles per CPU-s`` counts only the process's own CPU time inside
``filter.cycle`` (``time.process_time``), so it is what one dedicated core gives whatever
else runs on the machine (contention for caches still slows it). Results go to
``experiments/results/speed_dpf{--tag}.{md,json}``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def denoiser_ms(n: int = 64, reps: int = 30, clock=time.perf_counter) -> float:
    """ms per call of the shipped world's denoiser on ``n`` particles (``clock``:
    ``time.perf_counter`` for wall time, ``time.process_time`` for this process's CPU)."""
    import models

    w = models.load(str(ROOT / "models" / "checkpoints" / "l96.pt"), device="cpu").eval()
    ch = w.transition_sampler(torch.randn(n, 40))
    z = torch.randn(n, 40)
    with torch.no_grad():
        for _ in range(3):
            w.denoiser(z, ch.times[0], ch.cond)
        t = clock()
        for _ in range(reps):
            w.denoiser(z, ch.times[0], ch.cond)
    return (clock() - t) / reps * 1e3


def network_ab(rounds: int = 15, reps: int = 10, n: int = 64) -> dict:
    """CPU ms per call of the shipped backbone on ``n`` particles, the fast path
    (``ResNet1d.forward``) and the module path (``forward_reference``, the function before
    the speed-up) interleaved in this process (min and median over ``rounds``), and the
    largest difference of their outputs relative to the largest output."""
    import models

    w = models.load(str(ROOT / "models" / "checkpoints" / "l96.pt"), device="cpu").eval()
    net = w.denoiser.backbone
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(n, 40, generator=g), torch.randn(n, 1, 40, generator=g)
    c = torch.full((n,), 0.1)
    paths = {"module path (before)": net.forward_reference, "fast path (after)": net.forward}
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        rel = float((net(x, c, cond) - net.forward_reference(x, c, cond)).abs().max()
                    / net.forward_reference(x, c, cond).abs().max())  # fmt: skip
        for _ in range(rounds):
            for name, f in paths.items():
                f(x, c, cond)
                t = time.process_time()
                for _ in range(reps):
                    f(x, c, cond)
                times[name].append((time.process_time() - t) / reps * 1e3)
    out: dict = {"max_rel_diff": rel, "load": os.getloadavg()[0]}
    for k, v in times.items():
        out[k] = {"min_ms": min(v), "median_ms": statistics.median(v)}
    return out


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


def _namespace(steps: int, cycles: int, reuse: int | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        q=None, cycles=cycles, burn=cycles // 4, world="learned", steps=steps, radius=3.0,
        twist="gaussian", inner=0.5, letkf_infl=1.05, letkf_radius=3.0, etkf_infl=1.02,
        progress=0, reuse=reuse,
    )  # fmt: skip


def _worker(method: str, steps: int, cycles: int, reuse: int | None = None) -> dict:
    """One timed run in this process (whose ``sys.path`` picks the tree)."""
    import experiments.bench_dpf as bench  # from the tree first on sys.path
    from assim.filters.dpf import DiffusionParticleFilter
    from assim.filters.dpf_local import LocalDiffusionParticleFilter

    torch.set_num_threads(1)
    cpu = [0.0]  # process (CPU) time inside filter.cycle: insensitive to other processes

    def timed(orig):
        def cycle(self, *a, **k):
            t0 = time.process_time()
            try:
                return orig(self, *a, **k)
            finally:
                cpu[0] += time.process_time() - t0

        return cycle

    classes = (DiffusionParticleFilter, LocalDiffusionParticleFilter)
    saved = [c.__dict__["cycle"] for c in classes]
    for c, orig in zip(classes, saved, strict=True):
        c.cycle = timed(orig)
    try:
        r, calls = count_calls(
            lambda: bench.run_one("l96-std", method, 64, 0, _namespace(steps, cycles, reuse))
        )
    finally:
        for c, orig in zip(classes, saved, strict=True):
            c.cycle = orig
    net_ms = denoiser_ms(clock=time.process_time)  # this tree's network, CPU ms per call
    return dict(method=method, steps=steps, n=64, cycles=r["cycles"],
                cycles_per_s=r["cycles_per_s"], cycles_per_cpu_s=r["cycles"] / cpu[0],
                calls_per_cycle=calls / r["cycles"], denoiser_cpu_ms=net_ms,
                rmse_a=r["rmse_a"], load=os.getloadavg()[0],
                src=str(Path(bench.__file__).resolve().parents[1]))  # fmt: skip


def _run_tree(root: Path, method: str, steps: int, cycles: int, reuse: int | None = None) -> dict:
    """:func:`_worker` in a fresh process with ``root`` first on ``sys.path``."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(root)!r}); "
        f"sys.path.insert(1, {str(ROOT / 'experiments')!r}); import speed_dpf; "
        f"print(json.dumps(speed_dpf._worker({method!r}, {steps}, {cycles}, {reuse!r})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compare(args) -> int:
    base = Path(args.baseline).resolve()
    after = Path(args.after).resolve() if args.after else ROOT
    for opt, tree in (("--baseline", base), ("--after", after)):
        for sub in ("assim", "models", "experiments"):
            if not (tree / sub).is_dir():
                print(f"{opt} {tree}: no {sub}/ directory there", file=sys.stderr)
                return 2
    ms = denoiser_ms()
    runs: list[dict] = []
    variants = [("before", base, None), ("after", after, None)]
    if args.reuse:  # the local dpf's reuse_denoised option (an approximation)
        variants.append(("after, reuse_denoised", after, 1))
    for rep in range(args.reps):
        for steps in args.steps:
            for method in args.methods:
                for label, root, reuse in variants:
                    if reuse is not None and method != "ldpf":
                        continue
                    row = _run_tree(root, method, steps, args.cycles, reuse)
                    row.update(tree=label, rep=rep)
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    lines = [
        f"before = {base.name} (copy of the tree before the change), after = "
        f"{after.name if args.after else 'this tree'}; "
        f"{args.reps} alternating runs of {args.cycles} cycles each, every run its own "
        f"process, 1 thread, seed 0; load average {min(r['load'] for r in runs):.1f}-"
        f"{max(r['load'] for r in runs):.1f} on {os.cpu_count()} cores; denoiser call on "
        f"64 particles {ms:.1f} ms (wall, this tree, before the runs); `denoiser CPU ms` is "
        "the CPU time of one call on 64 particles measured in each run's process with its "
        "tree's code",
        "",
        "| method | diffusion steps | N | tree | cycles/s (median [min, max]) | vs before "
        "| cycles per CPU-s (median) | denoiser CPU ms / call (median) "
        "| denoiser calls/cycle | rmse.a (seed 0, short) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for steps in args.steps:
        for method in args.methods:
            base_rate = None
            for label, _, _ in variants:
                rs = [r for r in runs if (r["tree"], r["method"], r["steps"]) ==
                      (label, method, steps)]  # fmt: skip
                if not rs:
                    continue
                v = [r["cycles_per_s"] for r in rs]
                med = statistics.median(v)
                base_rate = med if base_rate is None else base_rate
                cpu = statistics.median(r["cycles_per_cpu_s"] for r in rs)
                net = statistics.median(r.get("denoiser_cpu_ms", math.nan) for r in rs)
                calls = statistics.mean(r["calls_per_cycle"] for r in rs)
                lines.append(
                    f"| {method} | {steps} | 64 | {label} | {med:.1f} [{min(v):.1f}, "
                    f"{max(v):.1f}] | {med / base_rate:.2f} | {cpu:.1f} | {net:.1f} "
                    f"| {calls:.2f} | {rs[0]['rmse_a']:.3f} |"
                )
    _write("\n".join(lines), runs, args.tag or "_compare")
    return 0


def _write(text: str, rows: list[dict], tag: str) -> None:
    print(text)
    out = ROOT / "experiments" / "results" / f"speed_dpf{tag}"
    for suffix, body in ((".md", text + "\n"), (".json", json.dumps(rows, indent=1))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, out.with_suffix(suffix))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5])
    p.add_argument("--cycles", type=int, default=150)
    p.add_argument("--methods", nargs="+", default=["ldpf", "dpf"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--baseline", default=None, help="older tree to compare with")
    p.add_argument("--after", default=None,
                   help="with --baseline: the tree to compare (default this one)")  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="runs per tree (with --baseline)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument(
        "--network",
        action="store_true",
        help="only time the backbone: fast path vs module path, interleaved",
    )
    p.add_argument("--reuse", action="store_true",
                   help="with --baseline: also the local dpf with reuse_denoised")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    if args.network:
        r = network_ab()
        before, after = r["module path (before)"], r["fast path (after)"]
        text = "\n".join([
            "Backbone of `l96.pt` (ResNet1d width 64, depth 4) on 64 particles, CPU ms per "
            f"call, 1 thread, both paths interleaved in one process (15 rounds of 10 calls); "
            f"load average {r['load']:.1f} on {os.cpu_count()} cores",
            "",
            "| path | min ms | median ms |",
            "|---|---|---|",
            f"| module path (`forward_reference`, the code before) | {before['min_ms']:.2f} "
            f"| {before['median_ms']:.2f} |",
            f"| fast path (`forward`) | {after['min_ms']:.2f} | {after['median_ms']:.2f} |",
            "",
            f"speed-up (median) {before['median_ms'] / after['median_ms']:.2f}x; largest "
            f"output difference {r['max_rel_diff']:.1e} of the largest output",
        ])  # fmt: skip
        _write(text, [r], args.tag or "_network")
        return 0
    if args.baseline:
        return _compare(args)
    rows = []
    ms = denoiser_ms()
    for steps in args.steps:
        for method in args.methods:
            prof = cProfile.Profile() if args.profile else None
            if prof:
                prof.enable()
            rows.append(_worker(method, steps, args.cycles))
            if prof:
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
                print(s.getvalue())
            rows[-1]["denoiser_ms_64"] = ms
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"denoiser call on 64 particles: {ms:.1f} ms (1 thread); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| method | diffusion steps | N | cycles | cycles/s | cycles per CPU-s "
        "| denoiser calls/cycle | rmse.a (short) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | 64 | {r['cycles']} | {r['cycles_per_s']:.1f} "
            f"| {r['cycles_per_cpu_s']:.1f} | {r['calls_per_cycle']:.2f} | {r['rmse_a']:.3f} |"
        )
    _write("\n".join(lines), rows, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
