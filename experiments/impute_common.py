"""Data, masks and scores shared by the imputation benchmarks (``bench_impute.py``,
``bench_anomaly.py``, ``train_priors.py``): the BENCHMARKS.md E protocol."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from assim.metrics import crps_ensemble
from experiments.atomic import write_atomic  # noqa: F401 (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("ostia_sst", "e1_north_america", "sst_anom")

# ----------------------------------------------------------------------------- data
KOLMOGOROV = {"kolmogorov32": (32, 64), "kolmogorov64": (64, 64), "kolmogorov32n": (32, 32)}


def load_kolmogorov(n: int, steps: int = 200, seed: int = 64, sim_n: int = 64):
    """Vorticity ``(time, y, x)`` of one seeded Kolmogorov-flow run (the catalogue's
    ``kolmogorov64`` physics: Re 1000, k_f 4, drag 0.1, snapshots every 0.2 time units
    after 100 spin-up steps), simulated on ``sim_n``² (64²) and, for ``n = 32``, averaged
    over 2 x 2 blocks (coarse observations of the resolved flow, as in SDA);
    ``kolmogorov32n`` is simulated directly on 32² (``sim_n = 32``): the dynamics the
    learned world ``kolmogorov32`` was trained on (training seeds 100/101, here 64).
    Cached as netCDF in the data cache folder."""
    import xarray as xr

    from assim.datasets import resolve_cache_dir, simulate_dataset

    tag = "" if sim_n == 64 else f"_sim{sim_n}"
    path = resolve_cache_dir() / f"bench_kolmogorov{n}{tag}_s{seed}_t{steps}.nc"
    if path.exists():
        return xr.open_dataset(path)["vorticity"].load(), None
    ds = simulate_dataset(
        "kolmogorov", steps=steps, seed=seed, dt=0.2, spinup=100, substeps=20,
        params=dict(n=sim_n, re=1000.0, k_f=4, drag=0.1, amplitude=1.0), dtype="float64",
    )  # fmt: skip
    da = ds["vorticity"]
    if n != sim_n:
        f = sim_n // n
        da = da.coarsen(y=f, x=f).mean()
        da = da.assign_coords(y=da["y"] - da["y"][0], x=da["x"] - da["x"][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    da.to_dataset(name="vorticity").to_netcdf(tmp)
    os.replace(tmp, path)
    return da.load(), None


def load(name: str):
    """``(DataArray (time, lat, lon), valid (lat, lon))`` of a packaged data set, or
    ``(time, y, x)`` vorticity for ``kolmogorov32``/``kolmogorov64``."""
    if name in KOLMOGOROV:
        n, sim_n = KOLMOGOROV[name]
        return load_kolmogorov(n, sim_n=sim_n)
    try:  # the project's catalogue (CF grid with a `mask` variable), when present
        from assim.datasets import load as load_catalog

        ds = load_catalog(name)
        var = ds.attrs.get("assim_variable") or [v for v in ds.data_vars if ds[v].ndim == 3][0]
        mask = ds["mask"].values.astype(bool) if "mask" in ds else None
        return ds[var].load(), mask
    except ImportError:
        pass
    import xarray as xr

    if name == "sst_anom":
        from eofs.examples import example_data_path

        da = xr.open_dataset(example_data_path("sst_ndjfm_anom.nc"))["sst"]
    else:
        import iris_sample_data

        fname, var = {
            "ostia_sst": ("ostia_monthly.nc", "surface_temperature"),
            "e1_north_america": ("E1_north_america.nc", "air_temperature"),
        }[name]
        da = xr.open_dataset(os.path.join(iris_sample_data.path, fname), use_cftime=True)[var]
    return da.load(), None


# ----------------------------------------------------------------------------- masks
def random_box(
    valid: np.ndarray, blat: int, blon: int, rng, tries: int = 100, min_valid: float = 0.5
) -> np.ndarray:
    """A ``blat x blon`` lat-lon box ``(lat, lon)`` at a random place where at least
    ``min_valid`` of it is valid (the last try otherwise)."""
    nlat, nlon = valid.shape
    for _ in range(tries):
        i0, j0 = rng.integers(0, nlat - blat + 1), rng.integers(0, nlon - blon + 1)
        box = np.zeros_like(valid)
        box[i0 : i0 + blat, j0 : j0 + blon] = True
        if (box & valid).sum() >= min_valid * box.sum():
            break
    return box


def make_masks(valid: np.ndarray, n_test: int, kind: str, seed: int) -> np.ndarray:
    """Hidden entries ``(n_test, P)`` over the valid points (P in C order of ``valid``)."""
    rng = np.random.default_rng(seed)
    p = int(valid.sum())
    if kind in ("30%", "70%"):
        frac = 0.3 if kind == "30%" else 0.7
        return rng.random((n_test, p)) < frac
    nlat, nlon = valid.shape
    box = random_box(valid, max(1, round(nlat * 6**-0.5)), max(1, round(nlon * 6**-0.5)), rng)
    k0 = rng.integers(0, n_test - 2)
    hidden = np.zeros((n_test, p), bool)
    hidden[k0 : k0 + 3] = box[valid][None]
    return hidden


# ----------------------------------------------------------------------------- metrics
def fair_crps(members: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fair ensemble CRPS per entry (:func:`assim.metrics.crps_ensemble`): ``members``
    ``(K, n)``, ``y`` ``(n,)``; a single member (a point estimate) scores its MAE."""
    if members.shape[0] == 1:
        return np.abs(members[0] - y)
    return crps_ensemble(members, y).numpy()


def scores(members: np.ndarray, mean: np.ndarray, y: np.ndarray) -> dict:
    lo, hi = np.quantile(members, [0.05, 0.95], axis=0)
    cov = np.mean((y >= lo) & (y <= hi)) if members.shape[0] > 1 else np.nan
    return dict(
        rmse=float(np.sqrt(np.mean((mean - y) ** 2))),
        crps=float(fair_crps(members, y).mean()),
        cov=float(cov),
    )


def z_prior(prior, fit: np.ndarray, groups: torch.Tensor) -> torch.Tensor:
    """Standardised fit-period anomalies under ``prior`` (NaN -> 0), ``(T, P)``."""
    return prior.standardize(torch.from_numpy(fit), groups).nan_to_num(0.0)


def literal(text: str):
    """``"0"`` -> 0, ``"0.3"`` -> 0.3, ``"None"`` -> None, else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def save_panel(name: str, panel, suffix: str = "") -> None:
    """PNG panel ``impute_<name><suffix>.png``: truth, masked input, mean, spread, a sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid, *fields = panel
    titles = ["truth", "masked input", "posterior mean", "posterior spread", "one sample"]
    if len(fields) == 5:
        fig, axes = plt.subplots(len(fields), 1, figsize=(8, 1.6 * len(fields) + 1))
    else:  # square torus fields with the dynamical smoother's mean, spread, sample
        titles = titles[:2] + [f"{t} (Gaussian)" for t in titles[2:]]
        titles += [f"{t} (EnKS world)" for t in titles[2:5]]
        titles = [t.replace(" (Gaussian) (EnKS world)", " (EnKS world)") for t in titles]
        fig, axes = plt.subplots(2, 4, figsize=(13, 6.5))
    axes = np.asarray(axes).reshape(-1)
    vmin, vmax = np.nanpercentile(fields[0], [2, 98])
    for ax, f, title in zip(axes, fields, titles, strict=True):
        g = np.full(valid.shape, np.nan)
        g[valid] = f
        kw = dict(vmin=vmin, vmax=vmax) if "spread" not in title else {}
        im = ax.imshow(g, origin="lower", aspect="auto", cmap="RdBu_r" if kw else "viridis", **kw)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"impute_{name}{suffix}.png", dpi=80)
    plt.close(fig)


def mean_table(rows: list[dict], keys: list[str], cols: dict[str, str]) -> str:
    """Markdown table of the means over seeds of ``rows``, grouped by ``keys`` (in order of
    appearance); ``cols`` maps a column to its ``header:format`` (e.g. ``"CRPS:.4f"``)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in cols:
        if col not in df:
            df[col] = np.nan
    agg = df.groupby(keys, sort=False)[list(cols)].mean()
    heads = [spec.split(":")[0] for spec in cols.values()]
    lines = [
        "| " + " | ".join([*keys, *heads]) + " |",
        "|" + "---|" * (len(keys) + len(cols)),
    ]
    for key, r in agg.iterrows():
        vals = [format(r[col], spec.split(":")[1]) for col, spec in cols.items()]
        lines.append("| " + " | ".join([*map(str, key), *vals]) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown table of the mean CRPS, RMSE, coverage and time per dataset, mask, method."""
    cols = {"crps": "CRPS:.4f", "rmse": "RMSE:.4f", "cov": "90% cov:.3f", "time": "time (s):.1f"}
    return mean_table(rows, ["dataset", "mask", "method"], cols)
