"""Lorenz-63 floors of the diffusion particle filter (BENCHMARKS.md B: L63-std, L63-cubic).

Settings: ``l63-std`` (dt 0.01, all 3 observed every 25 steps, R = 2 I) and ``l63-cubic``
(``y = x^3 + N(0, 8)``). Truth and observations are drawn exactly as
``experiments/bench_dpf.py`` draws them (same seeds, so ``l63-std`` runs see the same truth
as that script's), and only the analysis times are kept.

Methods (``--methods``):
* ``la``: the look-ahead window filter (:class:`assim.lookahead.LookaheadPF`) with the
  learned diffusion world ``models/checkpoints/l63.pt`` (:class:`~assim.lookahead.DiffusionFlow`,
  ``--steps`` diffusion steps): model error ``--q`` injected once per window (``--inject``
  first/last), Gauss–Newton proposal with ``--iters`` passes (0: bootstrap), the flow's
  Jacobian by ``--fd`` central/forward differences of the learned flow itself (nothing of
  the true model enters this method: truth and observations only); ``--ckpt`` another
  checkpoint (e.g. a retrained world);
* ``la-true``: the same filter with the true model (:class:`~assim.lookahead.PhysicalFlow`);
* either ``la`` method with ``--mix-max`` (> ``--mix``) runs the adaptive mixture weight of
  :class:`assim.lookahead_mix.AdaptiveMixLookahead` (weight in ``[--mix, --mix-max]``, from the
  previous window's posterior probability of the wide component; exact weights), and with
  ``--spread-factor beta < 1`` the analysis deflation of the same class (an approximation);
* ``pf-true``: the bootstrap PF with the true model and DAPPER's regularisation
  (``PartFilt(reg=--reg, NER=0.3)``, the reference ``PF N=100 0.38``).
The per-step dpf (``q`` at every step) of ``bench_dpf.py`` is run by that script.

Metrics: ``rmse.a`` (time mean over scored analyses, after ``--burn`` analyses, of the RMS
error of the weighted mean), spread/skill, mean ESS, ``lost`` (rmse.a > half the
climatological spread, as BENCHMARKS.md A) and ``late`` (mean error of the last 10 % of
analyses, to see a filter that lost the truth late), analyses/s (1 thread), the
rank-histogram chi^2 p-value (truth among the resampled, equally weighted members, every
``--rank-every``-th scored analysis, resampled with a generator of its own so the filter's
random stream is unchanged; the test assumes independence, so time correlation pushes p
down) and the log-evidence ``sum_k log p(y_k | y_{1:k-1})`` of the filter's model (the
table: its mean per scored analysis; a larger value = a model that predicts the
observations better). The json also keeps ``mean_mix`` (the mixture weight used, averaged
over analyses), every 10th error and spread, and the 250-analysis chunk means of the error.

``python experiments/bench_dpf_l63.py --setting l63-std --methods la --n 100 --windows 300``
Results: ``experiments/results/bench_dpf_<setting>_la<tag>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assim.filters.base import Ensemble  # noqa: E402
from assim.filters.pf import BootstrapPF  # noqa: E402
from assim.lookahead import DiffusionFlow, LookaheadPF, PhysicalFlow  # noqa: E402
from assim.lookahead_mix import AdaptiveMixLookahead  # noqa: E402
from assim.metrics import rank_histogram  # noqa: E402
from assim.obs import Cubic, GaussianNoise, Identity, Observation  # noqa: E402
from assim.smc import systematic  # noqa: E402
from experiments.atomic import write_atomic  # noqa: E402
from models.worlds.physical import physical_world  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
CKPT = ROOT / "models" / "checkpoints" / "l63.pt"
X0_MU, X0_STD, EVERY = (1.509, -1.531, 25.46), math.sqrt(2.0), 25  # DAPPER's X0
_REF_STD = "EnKF N=10 0.57 · PF N=100 0.38 · PF N=4000 0.26"
_REF_CUBIC = "locked: ~5e-4; EnKF N=10 lost 2-3/10, PF N=1000 6/10"
SETTINGS = {
    "l63-std": (Identity, dict(std=math.sqrt(2.0)), _REF_STD),
    "l63-cubic": (Cubic, dict(var=8.0), _REF_CUBIC),
}


def x0_draw(n: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    mu = torch.tensor(X0_MU, dtype=dtype)
    return mu + X0_STD * torch.randn(n, 3, generator=g, dtype=dtype)


def truth_and_obs(setting: str, windows: int, seed: int):
    """Truth ``(W, 3)`` and observations ``(W, 3)`` at the analysis times; the random
    stream is consumed as in ``bench_dpf.truth_and_obs`` (an observation every step)."""
    op, noise, _ = SETTINGS[setting]
    phys = physical_world("l63")
    g = torch.Generator().manual_seed(seed)
    x = x0_draw(1, g, torch.float64)
    obs = Observation(op(), GaussianNoise(**noise))
    xs, ys = [], []
    for k in range(windows * EVERY):
        x = phys.step(x)
        y = obs.sample(x.float(), g)[0]
        if (k + 1) % EVERY == 0:
            xs.append(x[0])
            ys.append(y)
    return torch.stack(xs), torch.stack(ys), obs


def run_one(setting: str, method: str, n: int, seed: int, args) -> dict:
    torch.set_num_threads(1)
    truth, ys, obs = truth_and_obs(setting, args.windows, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    # the true model only for the "-true" methods: the learned row sees truth and obs only
    phys = physical_world("l63") if method.endswith("-true") else None
    if method == "pf-true":
        filt = BootstrapPF(threshold=0.3, jitter=args.reg * n ** (-1.0 / 7))
        dtype = torch.float64
    else:
        filt = LookaheadPF(q=args.q, inject=args.inject, iters=args.iters,
                           inflation=args.inflation, ess_threshold=args.threshold,
                           linearise=args.linearise, mix=args.mix,
                           mix_scale=args.mix_scale, fd=args.fd)  # fmt: skip
        if args.mix_max is not None or args.spread_factor != 1.0:
            mix_max = args.mix if args.mix_max is None else args.mix_max
            filt = AdaptiveMixLookahead(filt, args.mix, mix_max, args.spread_factor)
        pf = getattr(filt, "pf", filt)
        if method == "la-true":
            flow, dtype = PhysicalFlow(phys), torch.float64
        else:
            import models

            world = models.load(str(args.ckpt), device="cpu")
            world.eval()
            flow, dtype = DiffusionFlow(world, steps=args.steps), torch.float32
    ens = Ensemble(x0_draw(n, g, dtype))
    clim_half = 0.5 * float(truth.var(0).mean().sqrt())
    err, spread, ess_l, log_z, ranks_e, ranks_y, mixes = [], [], [], [], [], [], []
    g_rank = torch.Generator().manual_seed(2000 + seed)  # own stream: the filter's is untouched
    t0 = time.time()
    with torch.no_grad():
        for w in range(args.windows):
            if method != "pf-true" and args.anneal > 0:
                # a fixed schedule (not adaptive): q from --q-start down to --q over the
                # first --anneal analyses, so the weights stay exact for a time-varying model
                frac = min(1.0, w / args.anneal)
                pf.q = math.exp((1 - frac) * math.log(args.q_start) + frac * math.log(args.q))
            if method == "pf-true":
                for _ in range(EVERY - 1):
                    ens, _ = filt.cycle(phys, ens, None, obs, g)
                ens, info = filt.cycle(phys, ens, ys[w].to(dtype), obs, g)
            else:
                ens, info = filt.window(flow, ens, ys[w], obs, EVERY, g)
            m = ens.mean().double()
            err.append(float(((m - truth[w]) ** 2).mean().sqrt()))
            spread.append(float(ens.var().clamp_min(0).mean().sqrt()))
            ess_l.append(float(info.get("ess", math.nan)))
            log_z.append(float(info.get("log_z", math.nan)))
            mixes.append(float(info.get("mix", args.mix)))
            if w >= args.burn and (w - args.burn) % args.rank_every == 0:
                idx = systematic(ens.log_w, n, g_rank)  # equally weighted members for ranks
                ranks_e.append(ens.x[idx].double())
                ranks_y.append(truth[w])
            if not math.isfinite(err[-1]):
                break
            if args.progress and (w + 1) % args.progress == 0:
                rate = (w + 1) / (time.time() - t0)
                recent = sum(err[-args.progress :]) / args.progress
                sp_recent = sum(spread[-args.progress :]) / args.progress
                msg = f"{setting} {method} N={n} seed={seed} analysis {w + 1}: rmse {recent:.3f}"
                msg += f" spread {sp_recent:.3f}"
                print(f"{msg} ({rate:.1f}/s)", file=sys.stderr, flush=True)
    secs = time.time() - t0
    burn = min(args.burn, len(err) // 4)
    e = err[burn:]
    rmse_a = sum(e) / len(e) if e else math.nan
    sp = sum(spread[burn:]) / len(e) if e else math.nan
    tail = err[-max(1, len(err) // 10) :]
    rank_p, counts = math.nan, []
    if ranks_e:
        rh = rank_histogram(torch.stack(ranks_e, 1), torch.stack(ranks_y), generator=g_rank)
        rank_p, counts = float(rh.pvalue), [int(c) for c in rh.counts]
    lz = log_z[burn:]
    return dict(
        setting=setting, method=method, n=n, seed=seed, q=args.q, inject=args.inject,
        iters=args.iters, steps=args.steps, linearise=args.linearise,
        inflation=args.inflation, reg=args.reg, anneal=args.anneal, q_start=args.q_start,
        mix=args.mix, mix_scale=args.mix_scale, fd=args.fd, mix_max=args.mix_max,
        spread_factor=args.spread_factor, mean_mix=sum(mixes) / max(1, len(mixes)),
        ckpt=Path(args.ckpt).name if method == "la" else "-",
        rmse_a=rmse_a, median_err=sorted(e)[len(e) // 2] if e else math.nan,
        spread_skill=sp / rmse_a if rmse_a > 0 else math.nan, rank_p=rank_p,
        rank_counts=counts, log_evidence=sum(log_z),
        log_evidence_per_analysis=sum(lz) / len(lz) if lz else math.nan,
        mean_ess=sum(ess_l) / max(1, len(ess_l)), late=sum(tail) / len(tail),
        lost=bool(not math.isfinite(rmse_a) or rmse_a > clim_half),
        analyses=len(err), analyses_per_s=len(err) / secs,
        err_series=err[:: max(1, len(err) // 200)],
        spread_series=spread[:: max(1, len(err) // 200)],
        chunk_means=[sum(c) / len(c) for c in (err[i : i + 250] for i in range(0, len(err), 250))],
    )  # fmt: skip


def summarise(rows: list[dict], setting: str) -> str:
    from statistics import median

    lines = [
        f"### {setting} (reference: {SETTINGS[setting][2]})",
        "",
        "| method | world | q | mix | inject | iters | steps | N | seeds | analyses "
        "| rmse.a median [min, max] | late err | spread/skill | rank p | log-ev./an. | mean ESS "
        "| lost | analyses/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    keyf = lambda r: (r["method"], r["q"], r["mix"], r["mix_scale"], r["inject"], r["iters"],  # noqa: E731
                      r["steps"], r["n"], r["linearise"], r.get("fd", "central"),
                      r.get("ckpt", "l63.pt" if r["method"] == "la" else "-"),
                      r.get("mix_max"), r.get("spread_factor", 1.0))  # fmt: skip
    for key in sorted({keyf(r) for r in rows}, key=str):
        rs = [r for r in rows if keyf(r) == key]
        v = [r["rmse_a"] for r in rs]
        method, q, mix, mix_scale, inject, iters, steps, n, lin, fd, ckpt, mix_max, beta = key
        world = ckpt if method == "la" else "true"
        mixs = f"{mix:g}×{mix_scale:g}q" if mix else "0"
        if mix_max is not None and mix_max != mix:
            mixs = f"adaptive {mix:g}–{mix_max:g} ×{mix_scale:g}q"
        if beta != 1.0:
            mixs = f"{mixs}, deflation β {beta:g}"
        if lin == "mean":
            inject = f"{inject} (lin. mean)"
        if fd == "forward":
            inject = f"{inject}, fwd FD"
        if method == "pf-true":
            q, mixs, inject, iters, steps = f"reg {rs[0]['reg']:g}", "-", "-", "-", "-"
        elif method == "la-true":
            steps = "-"
        fmt = ".2e" if min(v) < 0.01 else ".3f"
        lines.append(
            f"| {method} | {world} | {q} | {mixs} | {inject} | {iters} | {steps} | {n} | {len(rs)} "
            f"| {rs[0]['analyses']} | {median(v):{fmt}} [{min(v):{fmt}}, {max(v):{fmt}}] "
            f"| {median(r['late'] for r in rs):{fmt}} "
            f"| {median(r['spread_skill'] for r in rs):.2f} "
            f"| {median(r.get('rank_p', math.nan) for r in rs):.2g} "
            f"| {median(r.get('log_evidence_per_analysis', math.nan) for r in rs):.3f} "
            f"| {median(r['mean_ess'] for r in rs):.1f} | {sum(r['lost'] for r in rs)} "
            f"| {median(r['analyses_per_s'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="l63-std", choices=sorted(SETTINGS))
    p.add_argument("--methods", nargs="+", default=["la"], choices=["la", "la-true", "pf-true"])
    p.add_argument("--n", nargs="+", type=int, default=[100])
    p.add_argument("--windows", type=int, default=2000, help="analysis cycles")
    p.add_argument("--burn", type=int, default=200, help="analyses not scored")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--q", type=float, default=0.3)
    p.add_argument("--q-start", type=float, default=0.3, help="q at the first analysis")
    p.add_argument("--anneal", type=int, default=0, help="analyses from --q-start to --q")
    p.add_argument("--inject", default="first", choices=["first", "last"])
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--inflation", type=float, default=1.0)
    p.add_argument("--mix", type=float, default=0.0, help="weight of the wide component")
    p.add_argument("--mix-scale", type=float, default=10.0, help="its q / --q")
    p.add_argument(
        "--mix-max",
        type=float,
        default=None,
        help="adaptive mixture weight in [--mix, --mix-max] (assim.lookahead_mix)",
    )
    p.add_argument("--spread-factor", type=float, default=1.0,
                   help="analysis deflation beta (an approximation; 1: off)")  # fmt: skip
    p.add_argument("--linearise", default="particle", choices=["particle", "mean"])
    p.add_argument("--fd", default="central", choices=["central", "forward"],
                   help="finite differences of the flow's Jacobian")  # fmt: skip
    p.add_argument("--ckpt", default=str(CKPT), help="la: the learned world's checkpoint")
    p.add_argument("--threshold", type=float, default=0.5, help="resampling ESS fraction")
    p.add_argument("--steps", type=int, default=5, help="diffusion steps of the learned world")
    p.add_argument("--reg", type=float, default=2.4, help="pf-true: DAPPER's reg")
    p.add_argument("--tag", default="")
    p.add_argument("--progress", type=int, default=0)
    p.add_argument("--rank-every", type=int, default=5,
                   help="rank histogram: every k-th scored analysis")  # fmt: skip
    args = p.parse_args(argv)
    rows = []
    stem = f"bench_dpf_{args.setting}_la{args.tag}"
    partial = RESULTS / (stem + ".partial.jsonl")
    partial.write_text("")
    for method in args.methods:
        for n in args.n:
            for seed in args.seeds:
                rows.append(run_one(args.setting, method, n, seed, args))
                with partial.open("a") as fh:
                    fh.write(json.dumps(rows[-1]) + "\n")
    table = summarise(rows, args.setting)
    print(table)
    write_atomic(RESULTS / (stem + ".md"), table + "\n")
    write_atomic(RESULTS / (stem + ".json"), json.dumps(rows, indent=1))
    partial.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
