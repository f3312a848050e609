"""BENCHMARKS.md D on 2-D Kolmogorov flow for the four world kinds (issue #8).

Grid: ``--n`` (default 32², the size trainable on this 2-core box; BENCHMARKS asks for
64²: ``--n 64`` with worlds ``kolmogorov64_<kind>.pt`` trained on a GPU by
``experiments/gpu_kolmogorov64.sh``). Truth: the ``models.physics.Kolmogorov`` simulator
at that grid (Re 1000, k_f 4, drag 0.1, dt 0.2 = 20 RK4
sub-steps), held-out seed 7 (training data: seed 100, see ``train_kolmogorov.py``). ICs
4 time units apart; an analysis ensemble ``centre = truth + sigma_a e``, members
``centre + sigma_a e'`` (white noise, ``sigma_a`` = ``--sigma-a`` x the vorticity std);
``--members`` members forecast to ``--turnovers`` eddy turnover times. The eddy turnover
time is ``T = L / U`` with the forcing scale ``L = 2 pi / k_f`` and ``U`` the rms speed
of the truth (measured, reported).

Worlds: ``conditional`` (``--ckpt-dir``/``kolmogorov<n>_conditional.pt``, else the shipped
``models/checkpoints/kolmogorov32.pt`` at 32²) and ``dyffusion``, ``rolling``,
``function_space`` (``--ckpt-dir``/``kolmogorov<n>_<kind>.pt``, made by
``train_kolmogorov.py --config experiments/kolmogorov_<kind>.toml``); DYffusion reports
every intermediate data step (``forecast_path``), Rolling the paper's rolling sampler.
Baselines: the true model from the perturbed members, persistence (the members),
climatology (random snapshots of another run, seed 102). Metrics per lead: RMSE of the
ensemble mean, fair CRPS, spread/skill (``bench_forecast.metrics``).

Function-space world at other grids (``--fs-grids``): members and truth are spectrally
interpolated from the world's grid (Fourier truncation to a coarser grid, zero-padding to
a finer one: the same field),
the world is regridded (``FunctionSpace.regrid``) and scored on that grid against the
interpolated truth, next to persistence and the (interpolated) true model on that grid.

Inference-time ensemble widths (no retraining): ``--q conditional=0.3 function_space=0.5``
sets the model-error level ``q`` (state units: the reverse diffusion stops at noise level
``q`` and the step gains ``N(0, q^2)``, GP-coloured for the function-space world);
``--var-scale 0.25`` multiplies DYffusion's calibrated kernel variances
(:meth:`DYffusion.set_var_scale`). Several comma-separated values (``conditional=0.3,0.6``)
evaluate one row per value, for choosing them on a validation truth (``--seed``, the
held-out test truth is seed 7). Rolling's paper sampler (``rollout``) has no model-error
option.

Usage: ``python experiments/bench_forecast_worlds.py --system kolmogorov [--quick]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from bench_forecast import RESULTS, ROOT, metrics, plot_per_lead
from train_kolmogorov import DT, simulate

import models
from models.physics import Kolmogorov

KINDS = ("conditional", "dyffusion", "rolling", "function_space")
Q_KINDS = ("conditional", "function_space")
TEST_SEED = 7


def parse_q(items: list[str]) -> dict[str, list[float]]:
    """``["conditional=0.3,0.6", ...]`` -> ``{"conditional": [0.3, 0.6]}`` (``q >= 0``)."""
    out: dict[str, list[float]] = {}
    for item in items:
        kind, sep, vals = item.partition("=")
        if not sep or kind not in Q_KINDS:
            raise SystemExit(f"--q: expected KIND=V[,V..] with KIND in {Q_KINDS}, got {item!r}")
        try:
            out[kind] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise SystemExit(f"--q {item!r}: values must be numbers") from None
        if not all(v >= 0 for v in out[kind]):
            raise SystemExit(f"--q {item!r}: q must be >= 0")
    return out


def variants(kinds, q: dict[str, list[float]], var_scale: list[float] | None):
    """``(row name, kind, setting)`` per evaluated world; one value keeps the plain name
    unless it differs from the default (then ``kind q=v`` / ``dyffusion c=v``)."""
    out = []
    for kind in kinds:
        if kind in q:
            vals, key, default = q[kind], "q", 0.0
        elif kind == "dyffusion" and var_scale:
            vals, key, default = var_scale, "c", 1.0
        else:
            out.append((kind, kind, {}))
            continue
        for v in vals:
            name = kind if (len(vals) == 1 and v == default) else f"{kind} {key}={v:g}"
            out.append((name, kind, {key: v}))
    return out


CRITERIA = ("worst", "mean")


def _calibration_gap(per_lead: dict, criterion: str = "worst") -> float:
    """``|log(spread/skill)|`` at the worst lead (``"worst"``) or averaged over the leads
    (``"mean"``); 0 for a calibrated ensemble."""
    gap = np.abs(np.log(np.clip(np.asarray(per_lead["spread_skill"], dtype=float), 1e-6, None)))
    return float(gap.max() if criterion == "worst" else gap.mean())


def choose(
    path: str | Path, criterion: str = "worst"
) -> tuple[dict[str, list[float]], list[float] | None, dict, dict]:
    """Per kind, the variant of a validation run (its JSON) whose spread/skill is closest
    to 1: smallest ``|log(spread/skill)|`` at its worst lead (``criterion="worst"``, the
    form of the target "in [0.7, 1.3] at every lead") or averaged over the leads
    (``"mean"``, the earlier rule): ``(q, var_scale, picks, fs_q)`` for :func:`variants`,
    so a test run uses settings chosen on another truth.
    ``fs_q`` maps each regridded grid size of the validation run to the function-space
    ``q`` chosen there: ``q`` is a pointwise noise level, and the forecast error of a
    spectrally truncated field is not the same at every resolution, so it is chosen per
    grid (on validation, like the rest)."""
    res = json.loads(Path(path).read_text())
    best: dict[str, tuple[float, dict]] = {}
    for name, st in res["settings"].items():
        score = _calibration_gap(res["per_lead"][name], criterion)
        if st["kind"] not in best or score < best[st["kind"]][0]:
            best[st["kind"]] = (score, st)
    q = {k: [st["q"]] for k, (_, st) in best.items() if "q" in st}
    c = [best["dyffusion"][1]["c"]] if "c" in best.get("dyffusion", (0, {}))[1] else None
    key = f"{criterion}_abs_log_spread_skill"
    picks = {k: {**st, key: round(sc, 3)} for k, (sc, st) in best.items()}
    fs_q = {}
    for n, per in res.get("grids", {}).items():
        sets = res.get("grid_settings", {}).get(str(n), {})
        scored = [
            (_calibration_gap(per[nm], criterion), st["q"]) for nm, st in sets.items() if nm in per
        ]
        if scored:
            fs_q[int(n)] = min(scored)[1]
            picks[f"function_space at {n}²"] = {"q": fs_q[int(n)]}
    return q, c, picks, fs_q


def setup(world, kind: str, setting: dict) -> None:
    """Apply a variant's ``q`` / DYffusion variance scale (``c``) to ``world`` in place."""
    if "q" in setting:
        world.configure(q=setting["q"])
    if "c" in setting:
        world.set_var_scale(setting["c"])


K_F = 4


def spectral_resize(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(..., m, m)`` periodic fields to ``(..., n, n)`` by Fourier truncation / zero
    padding (band-limited interpolation; the Nyquist row/column is dropped)."""
    m = x.shape[-1]
    if n == m:
        return x
    f = torch.fft.fft2(x.double())
    k = min(m, n) // 2
    out = torch.zeros((*x.shape[:-2], n, n), dtype=f.dtype)
    idx = torch.cat([torch.arange(k), torch.arange(-k + 1, 0)])
    out[..., idx[:, None], idx[None, :]] = f[..., idx[:, None], idx[None, :]]
    return torch.fft.ifft2(out * (n * n) / (m * m)).real.to(x.dtype)


def eddy_turnover(w: torch.Tensor) -> float:
    """``T = (2 pi / k_f) / U`` with ``U`` the rms speed of vorticity fields ``(..., n, n)``."""
    u, v = Kolmogorov(w.shape[-1]).velocity(w.reshape(-1, *w.shape[-2:]).double())
    return 2 * math.pi / K_F / float((u**2 + v**2).mean().sqrt())


def true_model(w: torch.Tensor, leads: int) -> torch.Tensor:
    """``(B, leads, n, n)`` simulator forecasts (float64 inside)."""
    sim, x, out = Kolmogorov(w.shape[-1]), w.double(), []
    for _ in range(leads):
        for _ in range(20):
            x = sim.step(x, DT / 20)
        out.append(x.float())
    return torch.stack(out, 1)


def forecast(world, kind: str, flat: torch.Tensor, leads: int, g: torch.Generator):
    """``(B, leads, n, n)`` world forecasts at every data step."""
    if kind == "dyffusion":
        steps = math.ceil(leads / world.horizon)
        return world.forecast_path(flat, steps, members=flat.shape[0], generator=g)[:, :leads]
    if kind == "rolling":
        return world.rollout(flat, leads, members=flat.shape[0], generator=g)
    return world.forecast(flat, leads, members=flat.shape[0], generator=g)


def _m(fc: torch.Tensor, tr: torch.Tensor, b: int, m: int) -> dict:
    lead = tr.shape[1]
    return metrics(fc.reshape(b, m, lead, -1), tr.reshape(b, lead, -1))


def checkpoint_path(ckpt_dir: str, n: int, kind: str) -> Path:
    """``<ckpt_dir>/kolmogorov<n>_<kind>.pt``; the conditional world at 32² falls back to
    the shipped ``models/checkpoints/kolmogorov32.pt``."""
    path = Path(ckpt_dir) / f"kolmogorov{n}_{kind}.pt"
    if kind == "conditional" and n == 32 and not path.is_file():
        return ROOT / "models" / "checkpoints" / "kolmogorov32.pt"
    return path


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    from models.device import resolve_device

    dev, N = resolve_device(a.device), a.n
    worlds = {}
    for kind in a.kinds:
        path = checkpoint_path(a.ckpt_dir, N, kind)
        if path.is_file():
            worlds[kind] = models.load(path, device=dev)
        else:
            print(f"skip {kind}: no checkpoint {path.name} in {path.parent.name}/")
    gap = 20
    probe = simulate(N, a.seed, a.traj, 1, str(dev))
    t_eddy = eddy_turnover(probe)
    leads = math.ceil(a.turnovers * t_eddy / DT)
    truth = simulate(N, a.seed, a.traj, gap * (a.ics - 1) + leads + 1, str(dev))  # (traj, T, n, n)
    ics = torch.stack([truth[b, i * gap] for b in range(a.traj) for i in range(a.ics)])
    fut = torch.stack(
        [truth[b, i * gap + 1 : i * gap + 1 + leads] for b in range(a.traj) for i in range(a.ics)]
    )
    b, m = ics.shape[0], a.members
    g = torch.Generator().manual_seed(1)
    sig = a.sigma_a * float(truth.std())
    centre = ics + sig * torch.randn(ics.shape, generator=g)
    mem = centre[:, None] + sig * torch.randn((b, m, N, N), generator=g)
    flat = mem.reshape(-1, N, N)
    rows, secs, settings = {}, {}, {}
    runs = variants(list(worlds), a.q, a.var_scale)
    for name, kind, setting in runs:
        world = worlds[kind]
        setup(world, kind, setting)
        t0 = time.perf_counter()
        fc = forecast(world, kind, flat.to(dev), leads, torch.Generator(dev).manual_seed(2))
        fc = fc.cpu()
        secs[name] = time.perf_counter() - t0
        rows[name], settings[name] = _m(fc, fut, b, m), {"kind": kind, **setting}
        print(f"{name}: {secs[name]:.0f} s", flush=True)
    t0 = time.perf_counter()
    tm = true_model(flat.to(dev), leads).cpu()
    secs["true model"] = time.perf_counter() - t0
    rows["true model"] = _m(tm, fut, b, m)
    rows["persistence"] = _m(flat[:, None].expand(-1, leads, -1, -1), fut, b, m)
    pool = simulate(N, 102, 2, 40, str(dev)).reshape(-1, N, N)
    idx = torch.randint(0, pool.shape[0], (b * m,), generator=g)
    rows["climatology"] = _m(pool[idx][:, None].expand(-1, leads, -1, -1), fut, b, m)
    grids, grid_settings = {}, {}
    fs = [(nm, st) for nm, k, st in runs if k == "function_space"]
    for n in a.fs_grids if fs else []:  # regridded evaluation of the function-space world
        if n == N:
            continue
        x0, tr = spectral_resize(flat, n), spectral_resize(fut, n)
        grids[n] = {
            "true model": _m(spectral_resize(tm, n), tr, b, m),
            "persistence": _m(x0[:, None].expand(-1, leads, -1, -1), tr, b, m),
            "seconds": 0.0,
        }
        fs_n = fs  # every validation variant, or the q chosen for this grid (--choose-from)
        if n in a.fs_q:
            fs_n = [(f"function_space q={a.fs_q[n]:g}", {"q": a.fs_q[n]})]
        grid_settings[n] = {}
        for nm, st in fs_n:
            setup(worlds["function_space"], "function_space", st)
            wn = worlds["function_space"].regrid((n, n))
            t0 = time.perf_counter()
            g2 = torch.Generator(dev).manual_seed(2)
            fc = wn.forecast(x0.to(dev), leads, members=x0.shape[0], generator=g2).cpu()
            grids[n][nm] = _m(fc, tr, b, m)
            grids[n]["seconds"] += time.perf_counter() - t0
            grid_settings[n][nm] = {"kind": "function_space", **st}
    conv = lambda r: {k: {q: np.asarray(v).tolist() for q, v in d.items()} for k, d in r.items()}  # noqa: E731
    return {
        "per_lead": conv(rows),
        "grids": {n: {"seconds": g_.pop("seconds"), **conv(g_)} for n, g_ in grids.items()},
        "grid_settings": grid_settings,
        "seconds": secs,
        "leads": leads,
        "t_eddy": t_eddy,
        "sigma_a": sig,
        "cases": f"{a.traj} trajectories x {a.ics} ICs x {m} members",
        "truth_seed": a.seed,
        "grid": N,
        "device": str(dev),
        "settings": settings,
        "train": {
            nm: {q: worlds[k].meta.get(q) for q in ("global_steps", "train_seconds")}
            for nm, k, _ in runs
        },  # fmt: skip
    }


def picks(res: dict) -> list[int]:
    per = res["t_eddy"] / DT
    return sorted({1, *(min(res["leads"], max(1, round(t * per))) for t in (1, 2, 3, 5))})


def table(res: dict) -> str:
    ks = picks(res)
    te = res["t_eddy"]
    head = " | ".join(f"@{k * DT:.1f} ({k * DT / te:.1f} T)" for k in ks)
    lines = [f"| method | {head} |", "|---" * (len(ks) + 1) + "|"]

    def rows(per: dict, prefix: str = "") -> None:
        for name, mt in per.items():
            cells = [
                " / ".join(f"{mt[q][k - 1]:.{2 if q == 'spread_skill' else 3}f}"
                           for q in ("rmse", "crps", "spread_skill"))
                for k in ks
            ]  # fmt: skip
            lines.append(f"| {prefix}{name} | " + " | ".join(cells) + " |")

    rows(res["per_lead"])
    for n, per in res["grids"].items():
        rows({k: v for k, v in per.items() if k != "seconds"}, prefix=f"{n}²: ")
    p = res["per_lead"]["persistence"]
    t = res["per_lead"]["true model"]
    lines += [
        "",
        "| world | beats persistence (RMSE, every lead) | beats persistence (CRPS, every lead) "
        "| CRPS / true-model CRPS @1 T | spread/skill range | train steps / s | forecast s |",
        "|---|---|---|---|---|---|---|",
    ]
    one = min(res["leads"], max(1, round(te / DT))) - 1

    def verdict(w: dict, pers: dict, true: dict) -> str:
        """Beats persistence (RMSE, CRPS) at every lead, CRPS ratio @1 T, spread/skill."""
        br = all(x < y for x, y in zip(w["rmse"], pers["rmse"], strict=True))
        bc = all(x < y for x, y in zip(w["crps"], pers["crps"], strict=True))
        ss = w["spread_skill"]
        ratio = w["crps"][one] / true["crps"][one]
        return f"{br} | {bc} | {ratio:.2f} | [{min(ss):.2f}, {max(ss):.2f}]"

    for name, tr in res["train"].items():
        lines.append(
            f"| {name} | {verdict(res['per_lead'][name], p, t)} "
            f"| {tr['global_steps']} / {tr['train_seconds']} "
            f"| {res['seconds'].get(name, 0):.0f} |"
        )
    for n, per in res["grids"].items():
        for fs in (k for k in per if k.startswith("function_space")):
            lines.append(
                f"| {fs} at {n}² | {verdict(per[fs], per['persistence'], per['true model'])} "
                f"| (trained at {res['grid']}²) | {per['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    lead = np.arange(1, res["leads"] + 1) * DT / res["t_eddy"]
    series = dict(res["per_lead"])
    for n, per in res["grids"].items():
        for fs in (k for k in per if k.startswith("function_space")):
            series[f"{fs} {n}²"] = per[fs]
    styles = {name: {"ls": "--" if "²" in name else "-"} for name in series}
    plot_per_lead(lead, series, path, "lead (eddy turnover times)", styles, 2, legend_size=7)


def main(argv: list[str]) -> None:
    from assim.datasets import resolve_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default="kolmogorov")
    p.add_argument("--ckpt-dir", default=str(resolve_cache_dir() / "worlds2"))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--n", type=int, default=32, help="grid size (the worlds' training grid)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--traj", type=int, default=2)
    p.add_argument("--ics", type=int, default=2, help="ICs per trajectory (4 time units apart)")
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--turnovers", type=float, default=5.0)
    p.add_argument("--sigma-a", type=float, default=0.1, help="IC error, fraction of the std")
    p.add_argument("--fs-grids", type=int, nargs="+", default=[16, 64])
    p.add_argument(
        "--seed",
        type=int,
        default=TEST_SEED,
        help=f"truth trajectory seed ({TEST_SEED}: the test truth; another for validation)",
    )
    p.add_argument(
        "--q",
        nargs="+",
        default=[],
        metavar="KIND=V[,V..]",
        help=f"model-error level q per kind ({', '.join(Q_KINDS)}), state units",
    )
    p.add_argument(
        "--var-scale",
        type=lambda v: [float(x) for x in v.split(",")],
        default=None,
        metavar="C[,C..]",
        help="DYffusion kernel-variance scale(s)",
    )
    p.add_argument(
        "--choose-from",
        default=None,
        metavar="JSON",
        help="take q / var-scale per kind from a validation run's JSON (spread/skill closest "
        "to 1); replaces --q and --var-scale",
    )
    p.add_argument(
        "--criterion",
        default="worst",
        choices=CRITERIA,
        help="--choose-from rule: |log spread/skill| at the worst lead (default) or its mean",
    )
    p.add_argument("--quick", action="store_true", help="1 IC, 4 members, 1 turnover")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.q = parse_q(a.q)
    chosen, a.fs_q = None, {}
    if a.choose_from:
        a.q, a.var_scale, chosen, a.fs_q = choose(a.choose_from, a.criterion)
        print(f"chosen on {Path(a.choose_from).name}: {chosen}", flush=True)
    if a.var_scale is not None and not all(c > 0 for c in a.var_scale):
        raise SystemExit("--var-scale: values must be > 0")
    if a.quick:
        a.traj, a.ics, a.members, a.turnovers, a.tag = 1, 1, 4, 1.0, a.tag or "_quick"
    res = run(a)
    if chosen:
        res["chosen_on_validation"] = {"file": Path(a.choose_from).name, **chosen}
    text = table(res)
    grid = "" if a.n == 32 else str(a.n)
    stem = f"bench_forecast_worlds_kolmogorov{grid}{a.tag}"
    shown = " ".join(
        Path(x).name if "/" in x else x for x in argv if x not in ("--system", "kolmogorov")
    )
    head = (
        f"# {stem}\n\n`python experiments/bench_forecast_worlds.py --system kolmogorov "
        f"{shown}` — {a.n}² grid ({res['device']}), truth seed {a.seed}"
        f"{' (test)' if a.seed == TEST_SEED else ' (validation)'}, {res['cases']}, "
        f"sigma_a = {res['sigma_a']:.3f}, "
        f"eddy turnover T = {res['t_eddy']:.2f} time units ({res['leads']} steps of {DT} = "
        f"{a.turnovers:g} T); torch threads 1. Worlds: {Path(a.ckpt_dir).name}/.\n\n"
        "Cells: RMSE / fair CRPS / spread-skill at "
        "the lead (time units, eddy turnovers).\n\n"
    )
    if chosen:
        head += (
            f"Settings chosen on `{Path(a.choose_from).name}` (spread/skill closest to 1, "
            f"{a.criterion} lead): "
        )
        head += "; ".join(f"{k} {st}" for k, st in chosen.items()) + ".\n\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, body in ((".md", head + text + "\n"), (".json", json.dumps(res, indent=1))):
        tmp = RESULTS / f"{stem}{suffix}.tmp"
        tmp.write_text(body)
        tmp.replace(RESULTS / f"{stem}{suffix}")
    plot(res, RESULTS / f"{stem}.png")
    print(head + text)
