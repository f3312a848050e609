"""Benchmark of the diffusion particle filter on Lorenz-96 (BENCHMARKS.md B).

Settings (``--setting``): ``l96-std`` (40 vars, all observed every step, R = I),
``l96-sparse`` (every 4th variable), ``l96-sparse-long`` (every 4th, every 3 steps),
``l96-arctan`` (arctan of all 40, sigma 0.05, every 2 steps), ``l63-std`` (Lorenz-63,
dt 0.01, all 3 observed every 25 steps, R = 2I; learned world ``models/checkpoints/l63.pt``;
``--cycles``/``--burn`` count model steps, so 50000 steps = 2000 analysis cycles).
``rmse.a`` is scored at analysis times only (DAPPER), after ``--burn`` model steps. The
truth starts near
DAPPER's ``X0`` (``(1, 0, ..., 0)``), observations are drawn with the evaluation
seed; the world model never sees the equations at assimilation time (learned world).
Truth and initial ensemble are drawn from DAPPER's ``X0 = N((1, 0, ..., 0), 0.001 I)``.

Worlds:
* ``learned``: the conditional diffusion world ``models/checkpoints/l96.pt``
  (``models.load``), run with ``--steps`` diffusion steps and model-error level ``--q``.
* ``exact``: the true model with additive model error ``N(0, q^2)`` as an *exact*
  Gaussian diffusion chain (:class:`ExactModelErrorWorld`): with it the global dpf is the
  exact optimal-proposal particle filter of the true model (the study's 0.554 reference).
* ``true``: the true model (``Physical``) for the ensemble Kalman filters.

Methods: global dpf (``dpf``), local dpf (``ldpf``, ``--radius``), bootstrap PF (``pf``)
with the diffusion world, ETKF / LETKF with the diffusion world (``etkf``, ``letkf``) and
with the true model (``etkf-true``, ``letkf-true``). Metrics:
``rmse.a`` (time mean over scored cycles of the spatial RMS error of the analysis mean,
DAPPER's definition), ``spread`` (time mean of the RMS ensemble std) and spread/skill,
the rank-histogram chi^2 p-value (truth among the equally weighted, resampled members;
the test assumes independence, so small p is expected from time correlation), mean ESS,
divergence (``rmse.a`` > half the climatological spread of the truth run: 1.8 for L96),
analysis cycles/s (1 thread).

Options beyond the defaults: ``--adapt-q RHO --q-range LO HI`` (dpf/ldpf: model-error
level adapted from the innovations, :class:`~assim.filters.dpf.DiffusionParticleFilter`
``adapt_q``; the table shows the median mean ``q`` used), ``--sampler ddim --eta 0``
(deterministic learned step), ``--etkf-rtps``, ``--hybrid G`` (ldpf: hybrid
particle/LETKF update), ``--spread-factor B`` (ldpf: analysis anomalies times ``B`` in
``(0, 1]``, a calibration knob for an over-dispersed filter). Each json row also holds
``spread_skill_ms`` = ``sqrt((1 + 1/N) mean spread^2 / mean err^2)``, the second-moment
form of the ratio (diagnostic; the tables show DAPPER's ratio of time means).

``python experiments/bench_dpf.py --quick`` (< 60 s) ;
``python experiments/bench_dpf.py --cycles 2000 --seeds 0 1 2 --jobs 1`` (long; run it
in the background). Results: ``experiments/results/bench_dpf_<setting>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assim.filters.base import Ensemble  # noqa: E402
from assim.filters.dpf import make_dpf  # noqa: E402
from assim.filters.enkf import make_filter  # noqa: E402
from assim.filters.pf import BootstrapPF  # noqa: E402
from assim.metrics import rank_histogram  # noqa: E402
from assim.obs import Arctan, GaussianNoise, Identity, Observation, Subset  # noqa: E402
from assim.smc import systematic  # noqa: E402
from models.diffusion.kernel import GaussianKernel  # noqa: E402
from models.worlds.physical import physical_world  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
CKPTS = {name: ROOT / "models" / "checkpoints" / f"{name}.pt" for name in ("l96", "l63")}
# DAPPER's initial conditions X0 (truth and ensemble): L96 GaussRV(mu=(1, 0, ..., 0), C=0.001),
# L63 GaussRV(mu=(1.509, -1.531, 25.46), C=2)
X0 = {
    "l96": ([1.0] + [0.0] * 39, math.sqrt(0.001)),
    "l63": ([1.509, -1.531, 25.46], math.sqrt(2.0)),
}

_REF_STD = "EnKF-sqrt N=40 0.177 · LETKF 0.215 · PF N=3000 0.249"
SETTINGS = {
    "l96-std": dict(op=Identity, sigma=1.0, every=1, ref=_REF_STD),
    "l96-sparse": dict(op=lambda: Subset(every=4), sigma=1.0, every=1, ref="LETKF N=40 0.89-0.96"),
    "l96-sparse-long": dict(op=lambda: Subset(every=4), sigma=1.0, every=3, ref="LETKF 1.47-1.49"),
    "l96-arctan": dict(op=Arctan, sigma=0.05, every=2, ref="EnKF-sqrt 0.032 · LETKF 0.040"),
    "l63-std": dict(op=Identity, sigma=math.sqrt(2.0), every=25, system="l63",
                    ref="EnKF N=10 0.57 · PF N=100 0.38 · PF N=4000 0.26"),
}  # fmt: skip


class ExactModelErrorWorld:
    """``x_{k+1} = M(x_k) + N(0, q^2 I)`` as an exact variance-exploding diffusion chain.

    The target is an isotropic Gaussian around ``mu = M(x_k)``, so the reverse kernels
    are exact and diagonal: with ``x_t = x_f + nu_t eps`` and ``c_t = q^2 + nu_t^2``,
    ``p(x_s | x_t) = N(mu + c_s / c_t (x_t - mu), c_s - c_s^2 / c_t)``, ``x_{t_0} ~ N(mu, c_0)``,
    ``E[x_f | x_t] = mu + q^2 / c_t (x_t - mu)``, ``Var = q^2 nu_t^2 / c_t``."""

    def __init__(self, physical, q: float, steps: int = 2, nu_max: float = 20.0) -> None:
        self.physical, self.q = physical, float(q)
        self.state_shape, self.dt = physical.state_shape, physical.dt
        nu = torch.logspace(math.log10(nu_max), math.log10(max(q, 1e-3) * 0.3), steps)
        self.nu2 = torch.cat([nu**2, torch.zeros(1)]).double()
        self.times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)

    def transition_sampler(self, cond):
        return _ExactChain(self, self.physical.deterministic_step(cond))

    @torch.no_grad()
    def step(self, x, generator=None):
        chain = self.transition_sampler(x)
        z = chain.init(generator)
        for j in range(len(self.times) - 1):
            z = chain.kernel(z, j).sample(generator)
        return z


class _ExactChain:
    def __init__(self, world: ExactModelErrorWorld, mu: torch.Tensor) -> None:
        self.w, self.mu, self.times = world, mu, world.times
        self.c = (world.q**2 + world.nu2).to(mu.dtype)

    def init(self, generator=None):
        eps = torch.randn(self.mu.shape, generator=generator, dtype=self.mu.dtype)
        return self.mu + self.c[0].sqrt() * eps

    def kernel(self, x_t, j):
        c_t, c_s = self.c[j], self.c[j + 1]
        return GaussianKernel(self.mu + c_s / c_t * (x_t - self.mu), c_s - c_s**2 / c_t)

    def noise_var(self, j):
        return self.w.nu2[j].to(self.mu.dtype)

    def denoise(self, x_t, j):
        return self.mu + self.w.q**2 / self.c[j] * (x_t - self.mu)

    def denoise_var(self, j):
        return self.w.q**2 * self.noise_var(j) / self.c[j]

    def denoise_slope(self, j):
        return self.w.q**2 / self.c[j]


def system(setting: str) -> str:
    return SETTINGS[setting].get("system", "l96")


def x0_draw(setting: str, n: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    mu, std = X0[system(setting)]
    mu = torch.tensor(mu, dtype=dtype)
    return mu + std * torch.randn(n, len(mu), generator=g, dtype=dtype)


def truth_and_obs(setting: str, cycles: int, seed: int):
    """Truth ``(cycles, d)``, observations (NaN rows between observation times), obs."""
    cfg = SETTINGS[setting]
    phys = physical_world(system(setting))
    g = torch.Generator().manual_seed(seed)
    x = x0_draw(setting, 1, g, torch.float64)
    obs = Observation(cfg["op"](), GaussianNoise(std=cfg["sigma"]))
    xs, ys = [], []
    for k in range(cycles):
        x = phys.step(x)
        xs.append(x[0])
        y = obs.sample(x.float(), g)[0]
        if (k + 1) % cfg["every"]:
            y = torch.full_like(y, math.nan)
        ys.append(y)
    return torch.stack(xs).float(), torch.stack(ys), obs


def make_method(name: str, n: int, args):
    """``(filter, world_kind)``."""
    adapt = dict(adapt_q=getattr(args, "adapt_q", 0.0), q_range=getattr(args, "q_range", None))
    adapt.update(moves=getattr(args, "moves", 0), move_beta=getattr(args, "move_beta", 0.5))
    if name.startswith("dpf"):
        return make_dpf(None, twist=args.twist, inner_threshold=args.inner, **adapt), "diff"
    if name.startswith("ldpf"):
        reuse = getattr(args, "reuse", None)
        filt = make_dpf(None, radius=args.radius, inner_threshold=args.inner,
                        reuse_denoised=None if reuse is None else bool(reuse),
                        hybrid=getattr(args, "hybrid", 0.0) or None,
                        hybrid_radius=getattr(args, "hybrid_radius", None),
                        spread_factor=getattr(args, "spread_factor", 1.0), **adapt)  # fmt: skip
        return filt, "diff"
    if name.startswith("pf"):
        return BootstrapPF(), "diff"
    if name.startswith("letkf"):
        filt = make_filter("letkf", inflation=args.letkf_infl, radius=args.letkf_radius)
        return filt, "true" if name.endswith("-true") else "diff"
    rtps = getattr(args, "etkf_rtps", 0.0)
    if name.startswith("etkf-true"):
        return make_filter("etkf", inflation=args.etkf_infl, rtps=rtps), "true"
    if name.startswith("etkf"):
        return make_filter("etkf", inflation=args.etkf_infl, rtps=rtps), "diff"
    raise ValueError(name)


DEFAULT_Q = {"dpf": 0.5, "pf": 0.5, "ldpf": 0.15}  # model-error level per method (else 0)


def run_one(setting: str, method: str, n: int, seed: int, args) -> dict:
    torch.set_num_threads(1)
    q = args.q if args.q is not None else DEFAULT_Q.get(method, 0.0)
    truth, ys, obs = truth_and_obs(setting, args.cycles, seed)
    filt, kind = make_method(method, n, args)
    sysname = system(setting)
    if kind == "true":
        world = physical_world(sysname)
    elif args.world == "learned":
        import models

        world = models.load(getattr(args, "ckpt", None) or str(CKPTS[sysname]), device="cpu")
        if world.kind == "dyffusion":  # its own step is `horizon` data steps: filter per step
            from models.worlds.dyffusion import DYffusionDataStep

            world = DYffusionDataStep(world)
        opts = {"sampler": getattr(args, "sampler", None), "eta": getattr(args, "eta", None)}
        world.configure(steps=args.steps, q=q, **{k: v for k, v in opts.items() if v is not None})
        world.eval()
    else:
        world = ExactModelErrorWorld(physical_world(sysname), max(q, 0.05), args.steps)
    # divergence: rmse.a above half the climatological spread (from the truth itself)
    clim_half = 0.5 * float(truth.var(0).mean().sqrt())
    g = torch.Generator().manual_seed(1000 + seed)
    ens = Ensemble(x0_draw(setting, n, g))
    analysed = []  # analysis steps (an observation was assimilated): DAPPER's rmse.a
    err, spread, ess_list, inner_list, ranks_e, ranks_y, qs = [], [], [], [], [], [], []
    accs = []  # acceptance rates of the exact moves (--moves)
    t0 = time.time()
    with torch.no_grad():
        for k in range(args.cycles):
            y = ys[k]
            analysed.append(not bool(torch.isnan(y).all()))
            ens, info = filt.cycle(world, ens, None if torch.isnan(y).all() else y, obs, g)
            m = ens.mean()
            err.append(float(((m - truth[k]) ** 2).mean().sqrt()))
            spread.append(float(ens.var().clamp_min(0).mean().sqrt()))
            if analysed[-1]:
                ess_list.append(float(info.get("ess", n)))
                inner = info.get("min_inner_ess", math.nan)
                inner_list.append(float(inner) if inner is not None else math.nan)
                if info.get("q") is not None:
                    qs.append(float(info["q"]))
                if info.get("move_accept") is not None:
                    accs.append(float(info["move_accept"]))
            if k >= args.burn and analysed[-1] and len(ess_list) % 5 == 0:
                idx = systematic(ens.log_w, n, g)  # equally weighted members for ranks
                ranks_e.append(ens.x[idx])
                ranks_y.append(truth[k])
            if not math.isfinite(err[-1]):
                break
            if args.progress and (k + 1) % args.progress == 0:
                rate = (k + 1) / (time.time() - t0)
                msg = f"{setting} {method} N={n} seed={seed} cycle {k + 1}: rmse {err[-1]:.3f}"
                print(f"{msg} ({rate:.1f} cycles/s)", file=sys.stderr, flush=True)
    secs = time.time() - t0
    keep = [k for k in range(args.burn, len(err)) if analysed[k]]
    e = torch.tensor([err[k] for k in keep])
    rmse_a = float(e.mean()) if len(e) else math.nan
    sp = float(torch.tensor([spread[k] for k in keep]).mean()) if len(e) else math.nan
    # second-moment ratio sqrt(mean spread^2 (N + 1) / N / mean err^2): the calibration
    # identity E[err^2] = (1 + 1/N) E[spread^2] of an exchangeable ensemble (diagnostic only)
    ms_ratio = math.nan
    if len(e):
        s2 = torch.tensor([spread[k] ** 2 for k in keep]).mean() * (n + 1) / n
        ms_ratio = float((s2 / (e**2).mean()).sqrt())
    p = math.nan
    if ranks_e:
        p = float(rank_histogram(torch.stack(ranks_e, 1), torch.stack(ranks_y)).pvalue)
    return dict(
        setting=setting, method=method, n=n, seed=seed, rmse_a=rmse_a, spread=sp,
        spread_skill=sp / rmse_a if rmse_a > 0 else math.nan, rank_p=p,
        mean_ess=sum(ess_list) / max(1, len(ess_list)),
        mean_min_inner_ess=_nanmean(inner_list), cycles_per_s=sum(analysed) / secs,
        diverged=bool(not math.isfinite(rmse_a) or rmse_a > clim_half), cycles=len(err),
        analysis_cycles=sum(analysed), steps_per_s=len(err) / secs,
        world=args.world if kind == "diff" else "true", steps=args.steps, q=q,
        q_mean=_nanmean(qs), q_last=qs[-1] if qs else math.nan,
        move_accept=_nanmean(accs), hybrid=getattr(args, "hybrid", 0.0),
        moves=getattr(args, "moves", 0), spread_factor=getattr(args, "spread_factor", 1.0),
        spread_skill_ms=ms_ratio, argv=" ".join(sys.argv[1:]),
        rmse_series=err[:: max(1, len(err) // 200)],
    )  # fmt: skip


def _qnote(rows: list[dict]) -> str:
    """`` (used 0.31)``: the median over runs of the mean q used when q was adapted."""
    used = [r.get("q_mean", math.nan) for r in rows]
    if all(math.isfinite(u) and abs(u - r["q"]) < 1e-6 for u, r in zip(used, rows, strict=True)):
        return ""
    used = [u for u in used if math.isfinite(u)]
    return f" (used {sorted(used)[len(used) // 2]:.2f})" if used else ""


def _nanmean(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def _job(a):
    setting, method, n, seed, args = a
    return run_one(setting, method, n, seed, args)


def summarise(rows: list[dict], setting: str) -> str:
    from statistics import median

    lines = [
        f"### {setting} (reference: {SETTINGS[setting]['ref']})",
        "",
        "| method | world | q | N | seeds | rmse.a median [min, max] | spread/skill | rank p "
        "| mean ESS | min inner ESS | div | cycles/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    keys = sorted({(r["method"], r["n"], r["world"], r["q"]) for r in rows})
    for method, n, world, q in keys:
        rs = [r for r in rows if (r["method"], r["n"], r["world"], r["q"]) == (method, n, world, q)]
        v = [r["rmse_a"] for r in rs]
        ss, rp = median(r["spread_skill"] for r in rs), median(r["rank_p"] for r in rs)
        lines.append(
            f"| {method} | {world} | {q:g}{_qnote(rs)} | {n} | {len(rs)} "
            f"| {median(v):.3f} [{min(v):.3f}, {max(v):.3f}] | {ss:.2f} | {rp:.2g} "
            f"| {median(r['mean_ess'] for r in rs):.1f} "
            f"| {median(r['mean_min_inner_ess'] for r in rs):.1f} "
            f"| {sum(r['diverged'] for r in rs)} "
            f"| {median(r['cycles_per_s'] for r in rs):.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted({r["n"] for r in rows if r["method"] == method})
        med = []
        for n in pts:
            v = sorted(r["rmse_a"] for r in rows if r["method"] == method and r["n"] == n)
            med.append(v[len(v) // 2])
        ok = [(n, m) for n, m in zip(pts, med, strict=True) if math.isfinite(m) and m > 0]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o-", label=method)
    ax.axhline(0.25, ls="--", c="gray", lw=0.8, label="PF N=3000 (true model)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (particles / members)")
    ax.set_ylabel("rmse.a (median over seeds)")
    ax.set_title(setting)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="l96-std", choices=sorted(SETTINGS))
    p.add_argument("--world", default="learned", choices=["learned", "exact"])
    p.add_argument("--ckpt", default=None, help="learned world: shipped name or path "
                   "(default: the setting's l96/l63 checkpoint)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=["dpf", "ldpf", "pf", "etkf", "etkf-true"])
    p.add_argument("--ns", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--burn", type=int, default=200)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--q", type=float, default=None, help="model-error level (default per method)")
    p.add_argument("--radius", type=float, default=3.0)
    p.add_argument("--twist", default="gaussian")
    p.add_argument("--inner", type=float, default=0.5, help="inner resampling threshold")
    p.add_argument("--reuse", type=int, choices=[0, 1], default=None,
                   help="ldpf: reuse_denoised (1) or re-run the denoiser (0)")  # fmt: skip
    p.add_argument("--adapt-q", type=float, default=0.0, help="dpf: adapt q (EMA weight)")
    p.add_argument("--q-range", type=float, nargs=2, default=None, help="dpf: adapted q range")
    p.add_argument("--moves", type=int, default=0, help="dpf/ldpf: exact pCN moves per cycle")
    p.add_argument("--move-beta", type=float, default=0.5, help="pCN step size in (0, 1]")
    p.add_argument("--hybrid", type=float, default=0.0,
                   help="ldpf: share gamma of the likelihood given to an LETKF step")  # fmt: skip
    p.add_argument("--hybrid-radius", type=float, default=None, help="ldpf hybrid LETKF radius")
    p.add_argument("--spread-factor", type=float, default=1.0,
                   help="ldpf: analysis anomalies times this factor, (0, 1]")  # fmt: skip
    p.add_argument("--letkf-radius", type=float, default=3.0)
    p.add_argument("--letkf-infl", type=float, default=1.05)
    p.add_argument("--etkf-infl", type=float, default=1.02)
    p.add_argument("--etkf-rtps", type=float, default=0.0, help="ETKF relaxation to prior spread")
    p.add_argument("--sampler", default=None, help="learned world's sampler (ddpm, ddim, ...)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic step)")
    p.add_argument("--ldpf-ns", nargs="+", type=int, default=[64], help="N of ldpf/pf")
    p.add_argument("--kf-ns", nargs="+", type=int, default=[40], help="N of etkf/letkf")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--progress", type=int, default=0, help="print every K cycles (stderr)")
    p.add_argument("--quick", action="store_true", help="< 60 s smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.cycles, args.burn, args.seeds = 100, 25, [0]
        args.ns, args.methods = [16], ["dpf", "ldpf", "etkf-true"]
        if not CKPTS["l96"].exists():
            args.world = "exact"
    args.burn = min(args.burn, args.cycles // 4)
    ckpt = CKPTS[system(args.setting)]
    if args.world == "learned" and args.ckpt is None and not ckpt.exists():
        print(f"no checkpoint at {ckpt}; use --world exact", file=sys.stderr)
        return 2
    jobs = []
    for method in args.methods:
        kf = method.startswith(("etkf", "letkf"))
        ns = args.kf_ns if kf else (args.ldpf_ns if method in ("ldpf", "pf") else args.ns)
        ns = ([40] if kf else args.ns) if args.quick else ns
        jobs += [(args.setting, method, n, s, args) for n in ns for s in args.seeds]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_dpf_{args.setting}{'_quick' if args.quick else ''}{args.tag}"
    partial = RESULTS / (stem + ".partial.jsonl")  # one line per finished run
    partial.write_text("")
    rows = []
    if args.jobs > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap_unordered(_job, jobs):
                rows.append(row)
                with partial.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    else:
        for job in jobs:
            rows.append(_job(job))
            with partial.open("a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
    table = summarise(rows, args.setting)
    print(table)
    partial.unlink()
    for suffix, text in ((".md", table + "\n"), (".json", json.dumps(rows, indent=1))):
        tmp = RESULTS / (stem + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, RESULTS / (stem + suffix))
    plot(rows, args.setting, RESULTS / (stem + ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
