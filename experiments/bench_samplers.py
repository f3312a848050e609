"""Benchmark: sampler accuracy vs steps against an exact Gaussian target (dimension 16).

For each schedule, sampler and number of steps (8 ... 256) we draw a batch of 1024 samples
from the exact Gaussian oracle ``E[x0 | x_t]`` (so only the sampler is measured) and report

- ``w2_mc``: Wasserstein-2 between ``N(sample mean, sample cov)`` and the target
  ``N(mu, Sigma)``; closed form ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)``
  (scipy.linalg.sqrtm). It includes a Monte-Carlo floor, reported as ``floor`` (the same
  statistic for 1024 exact draws);
- ``w2_exact``: the same distance for the *exact* law of the discretised chain
  (``models.diffusion.oracles.chain_moments``): the discretisation error without MC noise;
- ``nfe``: denoiser evaluations; ``ms_per_batch``: wall time of one batch of 1024
  (median of ``--repeats``, one CPU thread unless ``--device cuda``).

Usage: ``python experiments/bench_samplers.py [--quick] [--device cpu|cuda]``.
Writes ``experiments/results/bench_samplers.{csv,md,png}`` atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.atomic import write_atomic as atomic_write  # noqa: E402
from models.device import resolve_device  # noqa: E402
from models.diffusion import DDIM, DDPM, EDM, CosineVP, EulerMaruyama, Heun, LinearVP  # noqa: E402
from models.diffusion.oracles import GaussianDenoiser, chain_moments  # noqa: E402

SAMPLERS = {
    "DDPM": lambda d: DDPM(d),
    "DDIM(eta=0)": lambda d: DDIM(d, eta=0.0),
    "DDIM(eta=0.5)": lambda d: DDIM(d, eta=0.5),
    "Euler-Maruyama": lambda d: EulerMaruyama(d),
    "Heun": lambda d: Heun(d),
}
SCHEDULES = {"CosineVP": CosineVP, "EDM": EDM, "LinearVP": LinearVP}


def w2_gaussian(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """Closed-form W2 between N(m1, s1) and N(m2, s2) (Dowson & Landau 1982)."""
    r2 = scipy.linalg.sqrtm(s2)
    cross = scipy.linalg.sqrtm(r2 @ s1 @ r2)
    val = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(cross))
    return float(np.sqrt(max(val, 0.0)))


def target(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    sigma = L @ L.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    mu = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
    return mu, sigma


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    mu, sigma = target(args.dim, args.seed)
    mu_np, sigma_np = mu.numpy(), sigma.numpy()
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    exact = torch.distributions.MultivariateNormal(mu, sigma).sample((args.batch,))
    floor = w2_gaussian(exact.mean(0).numpy(), np.cov(exact.numpy().T), mu_np, sigma_np)
    rows = []
    for sname in args.schedules:
        schedule = SCHEDULES[sname]()
        oracle = GaussianDenoiser(mu.float(), sigma.float(), schedule).to(device)
        oracle64 = GaussianDenoiser(mu, sigma, schedule)
        for name, make in SAMPLERS.items():
            sampler = make(oracle)
            for steps in args.steps:
                times = []
                for _ in range(args.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    x = sampler.sample((args.batch, args.dim), steps=steps, generator=g)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                xs = x.double().cpu().numpy()
                w2 = w2_gaussian(xs.mean(0), np.cov(xs.T), mu_np, sigma_np)
                m, c = chain_moments(make(oracle64), args.dim, steps)
                w2x = w2_gaussian(m.numpy(), c.numpy(), mu_np, sigma_np)
                nfe = 2 * steps - 1 if name == "Heun" else steps
                rows.append(
                    dict(
                        schedule=sname,
                        sampler=name,
                        steps=steps,
                        nfe=nfe,
                        w2_mc=w2,
                        w2_exact=w2x,
                        floor=floor,
                        ms_per_batch=1e3 * float(np.median(times)),
                        device=str(device),
                    )
                )
                r = rows[-1]
                print(
                    f"{sname:9s} {name:15s} {steps:4d} nfe={nfe:4d} W2_mc={w2:8.4f} "
                    f"W2_exact={w2x:9.5f} ms={r['ms_per_batch']:8.1f}",
                    flush=True,
                )
    return rows


def markdown(rows: list[dict], steps: list[int]) -> str:
    """One table per schedule: rows samplers, columns steps, cells 'W2_mc / W2_exact (ms)'."""
    out = io.StringIO()
    floor = rows[0]["floor"]
    out.write(
        f"W2 to the exact N(mu, Sigma) in dimension {DIM_FOR_TABLE}, batch {BATCH_FOR_TABLE}; "
        f"cell = W2 of the batch / W2 of the exact chain law (ms per batch). "
        f"MC floor of W2 for {BATCH_FOR_TABLE} exact draws: {floor:.4f}. "
        f"Device: {rows[0]['device']}.\n\n"
    )
    for sname in dict.fromkeys(r["schedule"] for r in rows):
        out.write(f"**{sname}**\n\n| sampler | " + " | ".join(map(str, steps)) + " |\n")
        out.write("|---|" + "---|" * len(steps) + "\n")
        for name in dict.fromkeys(r["sampler"] for r in rows):
            cells = []
            for s in steps:
                r = next(
                    (
                        x
                        for x in rows
                        if x["schedule"] == sname and x["sampler"] == name and x["steps"] == s
                    ),
                    None,
                )
                cells.append(
                    ""
                    if r is None
                    else f"{r['w2_mc']:.3f} / {r['w2_exact']:.3g} ({r['ms_per_batch']:.0f})"
                )
            out.write(f"| {name} | " + " | ".join(cells) + " |\n")
        out.write("\n")
    return out.getvalue()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheds = list(dict.fromkeys(r["schedule"] for r in rows))
    fig, axes = plt.subplots(1, len(scheds), figsize=(4.2 * len(scheds), 3.6), squeeze=False)
    for ax, sname in zip(axes[0], scheds, strict=True):
        for name in dict.fromkeys(r["sampler"] for r in rows):
            rr = [r for r in rows if r["schedule"] == sname and r["sampler"] == name]
            (line,) = ax.loglog(
                [r["nfe"] for r in rr], [r["w2_exact"] for r in rr], "-o", ms=3, label=name
            )
            ax.loglog([r["nfe"] for r in rr], [r["w2_mc"] for r in rr], ":", color=line.get_color())
        ax.axhline(rows[0]["floor"], color="grey", lw=0.8, ls="--", label="MC floor (1024)")
        ax.set_title(sname)
        ax.set_xlabel("denoiser evaluations")
        ax.set_ylim(bottom=1e-4)
    axes[0][0].set_ylabel("W2 to target (solid: exact chain, dotted: batch)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


DIM_FOR_TABLE = 16
BATCH_FOR_TABLE = 1024


def main(argv: list[str] | None = None) -> int:
    global DIM_FOR_TABLE, BATCH_FOR_TABLE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CosineVP only, steps 8/32/128")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--schedules", nargs="+", default=["CosineVP", "EDM", "LinearVP"], choices=list(SCHEDULES)
    )
    p.add_argument("--steps", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    args = p.parse_args(argv)
    if args.quick:
        args.schedules, args.steps, args.repeats = ["CosineVP"], [8, 32, 128], 1
    torch.set_num_threads(1)
    DIM_FOR_TABLE, BATCH_FOR_TABLE = args.dim, args.batch
    rows = run(args)
    stem = args.out / f"bench_samplers{args.tag}"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(stem.with_suffix(".csv"), buf.getvalue().encode())
    md = markdown(rows, args.steps)
    atomic_write(stem.with_suffix(".md"), md.encode())
    plot(rows, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
