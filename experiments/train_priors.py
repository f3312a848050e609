"""Fit the imputation / anomaly priors of BENCHMARKS.md E on the fit period (first 80 %).

1. The default Gaussian space-time prior (:func:`assim.impute.fit_field_prior`) for each
   data set, saved to ``models/checkpoints/prior_<dataset>.pt`` (a few hundred kB; the
   Matérn residual is stored by its hyperparameters and rebuilt on load; the spread
   model -- "local" by default -- and the held-out calibration factors are stored too).
2. ``--diffusion``: a small UNet diffusion prior on the standardised anomalies of
   ``sst_anom`` (land = 0 plus a mask channel), trained on CPU, and a comparison of
   replacement inpainting with it against the Gaussian prior (spatial only and
   space-time) on the 30 % mask of the test period.

    python experiments/train_priors.py [--datasets ...] [--diffusion] [--steps 1500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assim.impute import (  # noqa: E402
    field_points,
    fit_field_prior,
    grid_geometry,
    impute_array,
    season_index,
)
from experiments.bench_impute import DATASETS, RESULTS, fair_crps, load  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "models" / "checkpoints"


def fit_gaussian(name: str, log) -> None:
    da, mask = load(name)
    valid, lat, lon = field_points(da, mask)
    vals = torch.from_numpy(np.asarray(da.values)[:, valid].astype(np.float64))
    groups, n_groups = season_index(da[da.dims[0]])
    n_fit = int(round(0.8 * vals.shape[0]))
    t0 = time.time()
    prior = fit_field_prior(
        vals[:n_fit],
        torch.from_numpy(groups[:n_fit]),
        torch.from_numpy(lat),
        torch.from_numpy(lon),
        n_groups,
        generator=torch.Generator().manual_seed(0),
        geometry=grid_geometry(da),
    )
    CKPT.mkdir(parents=True, exist_ok=True)
    path = CKPT / f"prior_{name}.pt"
    torch.save(prior.state_dict(), path)
    log(
        f"{name}: rank {prior.basis.shape[1]}, Matérn length {prior.length:.0f} km, nugget "
        f"{prior.nugget}, scale {prior.scale:.3f}, spread {prior.spread}, fitted in "
        f"{time.time() - t0:.0f}s -> "
        f"{path.name} ({path.stat().st_size / 1e6:.2f} MB)"
    )


def diffusion_experiment(steps: int, log) -> None:
    """Train a UNet denoiser on sst_anom anomalies; compare imputation CRPS (30 % mask)."""
    from assim.smoother import guided_inpaint
    from experiments.bench_impute import make_masks
    from models.backbones.unet2d import UNet2d
    from models.diffusion.denoisers import Denoiser
    from models.diffusion.samplers import DDPM
    from models.diffusion.schedules import CosineVP

    da, mask = load("sst_anom")
    valid, lat, lon = field_points(da, mask)
    vals = torch.from_numpy(np.asarray(da.values)[:, valid].astype(np.float64))
    groups, n_groups = season_index(da[da.dims[0]])
    g = torch.from_numpy(groups)
    n_fit = int(round(0.8 * vals.shape[0]))
    gen = torch.Generator().manual_seed(0)
    prior = fit_field_prior(
        vals[:n_fit],
        g[:n_fit],
        torch.from_numpy(lat),
        torch.from_numpy(lon),
        n_groups,
        generator=gen,
    )
    z = prior.standardize(vals, g).float()
    grid = torch.zeros(z.shape[0], *valid.shape)
    grid[:, torch.from_numpy(valid)] = z
    train = grid[:n_fit]
    m = torch.from_numpy(valid)
    net = UNet2d(width=32, mults=(1, 2), periodic=(False, False), mask=m)
    den = Denoiser(net, CosineVP(), sigma_data=float(train[:, m].std()))
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    t0 = time.time()
    for it in range(steps):
        idx = torch.randint(0, n_fit, (32,), generator=gen)
        x0 = train[idx] * m  # land stays 0
        loss = den.loss(x0, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 250 == 0 or it == steps - 1:
            log(f"  diffusion step {it}: loss {loss.item():.4f}")
    n_par = sum(p.numel() for p in den.parameters())
    log(f"trained UNet denoiser ({n_par} parameters) in {time.time() - t0:.0f}s")
    den.eval()
    test = vals[n_fit:]
    hid = torch.from_numpy(make_masks(valid, test.shape[0], "30%", 0))
    obs = test.clone()
    obs[hid] = float("nan")
    k = 16
    rows = {}
    # Gaussian prior, spatial only (window 1) and space-time (whole test window)
    for label, window in (("Gaussian, spatial", 1), ("Gaussian, space-time", 12)):
        smp, mean = impute_array(prior, obs, g[n_fit:], k, torch.Generator().manual_seed(1), window)
        rows[label] = (smp[:, hid].numpy(), mean[hid].numpy())
    sampler = DDPM(den)
    zs = prior.standardize(obs, g[n_fit:]).float()
    out = []
    t0 = time.time()
    for j in range(test.shape[0]):
        x = torch.zeros(valid.shape)  # land observed as 0
        x[m] = zs[j]
        with torch.no_grad():
            s = guided_inpaint(sampler, x, k, steps=64, generator=torch.Generator().manual_seed(j))
        out.append(s[:, m].double())
    zsmp = torch.stack(out, 1)  # (k, T, P)
    smp = prior.destandardize(zsmp, g[n_fit:])
    rows["UNet diffusion, replacement"] = (smp[:, hid].numpy(), smp.mean(0)[hid].numpy())
    log(f"diffusion inpainting of {test.shape[0]} fields x {k} samples: {time.time() - t0:.0f}s")
    y = test[hid].numpy()
    lines = ["| prior (sst_anom, 30 % mask, seed 0) | CRPS | RMSE | 90% cov |", "|---|---|---|---|"]
    for label, (ens, mean) in rows.items():
        lo, hi = np.quantile(ens, [0.05, 0.95], axis=0)
        lines.append(
            f"| {label} | {fair_crps(ens, y).mean():.4f} | "
            f"{np.sqrt(np.mean((mean - y) ** 2)):.4f} | {np.mean((y >= lo) & (y <= hi)):.3f} |"
        )
    md = "\n".join(lines)
    head = (
        f"# UNet diffusion prior on sst_anom ({steps} Adam steps, batch 32, 64-step DDPM "
        f"replacement inpainting, K={k}) vs the Gaussian prior\n\n"
    )
    (RESULTS / "diffusion_prior_sst_anom.md").write_text(head + md + "\n")
    log(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--diffusion", action="store_true", help="also train the UNet prior")
    ap.add_argument("--steps", type=int, default=1500, help="diffusion training steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logf = open(RESULTS / "train_priors.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    for name in args.datasets:
        fit_gaussian(name, log)
    if args.diffusion:
        diffusion_experiment(args.steps, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
