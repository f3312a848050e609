"""Imputation: exactness of the default Gaussian prior's posterior, bit-for-bit observed
entries, the xarray/CLI edges and their errors, and the diffusion inpainting path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from assim.cli import main
from assim.errors import InputError
from assim.impute import (
    FieldPrior,
    field_data,
    field_points,
    fit_field_prior,
    impute,
    impute_array,
    prior_for,
)
from assim.smoother import gaussian_conditional, guided_inpaint


def _grid(nlat: int = 4, nlon: int = 5):
    lat = torch.linspace(-10.0, 10.0, nlat, dtype=torch.float64)
    lon = torch.linspace(100.0, 120.0, nlon, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return lat, lon, la.flatten(), lo.flatten()


def _prior(seed: int = 0) -> FieldPrior:
    """A small FieldPrior: 2 seasons, rank-2 EOF part with AR(1), Matérn residual."""
    _, _, la, lo = _grid()
    p = la.numel()
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, 2, generator=g, dtype=torch.float64))
    mean = 10 + torch.randn(2, p, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(p, generator=g, dtype=torch.float64)
    return FieldPrior(
        la,
        lo,
        mean,
        std,
        u,
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        torch.tensor([0.8, 0.3], dtype=torch.float64),
        900.0,
        0.05,
        0.7,
    )


def _dense_cov(prior: FieldPrior, n_steps: int, groups: torch.Tensor) -> torch.Tensor:
    """Physical-unit covariance of a window: D (W C_a W^T + I_T ⊗ K) D, D = diag(std)."""
    w = prior.window
    big = torch.block_diag(*[w.basis] * n_steps)
    c = big @ w.amp_cov(n_steps) @ big.T + torch.block_diag(*[w.resid_cov] * n_steps)
    d = prior.clim_std.repeat(n_steps)
    return d[:, None] * c * d[None, :]


def test_gaussian_prior_imputation_is_the_exact_conditional(gen) -> None:
    prior = _prior()
    groups = torch.tensor([0, 1, 0])
    p = prior.lat.numel()
    truth = prior.destandardize(prior.window.sample(1, 3, gen(1))[0], groups)
    vals = truth.clone()
    hid = torch.zeros_like(vals, dtype=torch.bool)
    hid[0, :6] = hid[1, 5:12] = hid[2, 14:] = True
    vals[hid] = float("nan")
    n = 20000
    smp, mean = impute_array(prior, vals, groups, n, gen(2), window=3)
    mu = prior.clim_mean[groups].flatten()
    ref_mean, ref_cov = gaussian_conditional(mu, _dense_cov(prior, 3, groups), vals.flatten())
    # posterior mean path: closed form, to round-off
    assert torch.allclose(mean.flatten(), ref_mean, atol=1e-9, rtol=0)
    h = hid.flatten()
    flat, m, c = smp.reshape(n, -1)[:, h], ref_mean[h], ref_cov[h][:, h]
    # MC tolerances: sd(mean_hat) = sqrt(c_ii/n), sd(cov_hat_ij) = sqrt((c_ii c_jj + c_ij^2)/n);
    # 5 sd on 19 means / 361 covariances -> false failure probability < 1e-3.
    assert torch.all((flat.mean(0) - m).abs() < 5 * (torch.diagonal(c) / n).sqrt())
    dg = torch.diagonal(c)
    sd_c = ((dg[:, None] * dg[None, :] + c**2) / n).sqrt()
    assert torch.all((torch.cov(flat.T) - c).abs() < 5 * sd_c)
    assert smp.shape == (n, 3, p)


def test_windows_are_independent_chunks(gen) -> None:
    """window=1 conditions each step on itself only: the mean is the spatial conditional."""
    prior = _prior()
    groups = torch.tensor([1, 0])
    vals = prior.destandardize(prior.window.sample(1, 2, gen(3))[0], groups)
    vals[1, :8] = float("nan")
    _, mean = impute_array(prior, vals, groups, 4, gen(4), window=1)
    sig = prior.window.spatial_cov() * prior.clim_std[:, None] * prior.clim_std[None, :]
    ref, _ = gaussian_conditional(prior.clim_mean[0], sig, vals[1])
    assert torch.allclose(mean[1], ref, atol=1e-9)


def _dataarray(prior: FieldPrior, gen, dtype=np.float32) -> xr.DataArray:
    lat, lon, _, _ = _grid()
    groups = torch.arange(6) % 2
    x = prior.destandardize(prior.window.sample(1, 6, gen(5))[0], groups).numpy()
    x = x.reshape(6, lat.numel(), lon.numel()).astype(dtype)
    x[:, 0, 0] = np.nan  # "land"
    time = xr.date_range("2000-01-01", periods=6, freq="YS")
    return xr.DataArray(
        x,
        dims=("time", "lat", "lon"),
        name="sst",
        coords={"time": time, "lat": lat.numpy(), "lon": lon.numpy()},
    )


def test_observed_entries_are_kept_bit_for_bit(gen) -> None:
    prior = _prior()
    da = _dataarray(prior, gen)
    rng = np.random.default_rng(0)
    v = da.values.copy()
    v[rng.random(v.shape) < 0.4] = np.nan
    da = da.copy(data=v)
    fitted = fit_field_prior(
        torch.from_numpy(v.reshape(6, -1)[:, 1:].astype(np.float64)),
        torch.zeros(6),
        prior.lat[1:],
        prior.lon[1:],
        1,
        rank=1,
        generator=gen(0),
    )
    ds = impute(da, fitted, n=5, generator=gen(6))
    obs = np.isfinite(v)
    assert ds["sst"].dtype == np.float32
    for k in range(5):
        assert np.array_equal(ds["sst"].values[k][obs], v[obs])  # exact, not allclose
    assert np.array_equal(ds["sst_mean"].values[obs], v[obs])
    imp = ds["imputed"].values.astype(bool)
    assert imp.sum() == (~obs).sum() - 6  # every NaN except the land point is filled
    assert np.all(np.isfinite(ds["sst"].values[:, imp]))
    assert np.all(np.isnan(ds["sst"].values[:, :, 0, 0]))  # land stays NaN
    lo, hi = ds["sst_lower"].values[imp], ds["sst_upper"].values[imp]
    assert np.all(lo <= hi)
    assert ds["member"].attrs["standard_name"] == "realization"


def test_errors_are_clear(gen) -> None:
    prior = _prior()
    da = _dataarray(prior, gen)
    with pytest.raises(InputError, match="NaN everywhere"):
        impute(da * np.nan, prior, n=2)
    with pytest.raises(InputError, match="mask has shape"):
        field_points(da, np.ones((3, 3)))
    with pytest.raises(InputError, match="every value is NaN"):
        impute_array(prior, torch.full((2, 20), float("nan")), torch.zeros(2), 2)
    with pytest.raises(InputError, match="expects"):
        impute_array(prior, torch.zeros(2, 7), torch.zeros(2), 2)
    with pytest.raises(InputError, match="grid points"):
        impute(da.isel(lat=slice(0, 3)), prior, n=2)


def _gappy_file(tmp_path, gen):
    """A netCDF file of ``_dataarray`` fields with a gap at step 2: ``(prior, values, path)``."""
    prior = _prior()
    da = _dataarray(prior, gen)
    v = da.values.copy()
    v[2, 1:3, 1:4] = np.nan
    path = tmp_path / "in.nc"
    da.copy(data=v).to_dataset().to_netcdf(path)
    return prior, v, path


def test_cli_errors_and_round_trip(tmp_path, gen, capsys) -> None:
    prior, v, path = _gappy_file(tmp_path, gen)
    assert main(["impute", str(path), "--var", "nope", "--out", str(tmp_path / "o.nc")]) == 2
    assert "variable 'nope' not found" in capsys.readouterr().err
    ckpt = tmp_path / "prior.pt"
    torch.save(prior.state_dict(), ckpt)
    out = tmp_path / "out.nc"
    bad = [
        "impute",
        str(path),
        "--var",
        "sst",
        "--prior",
        str(tmp_path / "missing.pt"),
        "--out",
        str(out),
    ]
    assert main(bad) == 2
    assert "file not found" in capsys.readouterr().err
    # the checkpoint has 20 points, the file 19 valid ones (land at [0, 0]) -> grid error
    assert main(["impute", str(path), "--var", "sst", "--prior", str(ckpt), "--out", str(out)]) == 2
    assert "grid" in capsys.readouterr().err
    assert not out.exists()  # nothing partial written
    rc = main(["impute", str(path), "--var", "sst", "--samples", "4", "--out", str(out)])
    assert rc == 0
    ds = xr.open_dataset(out)
    assert ds["sst"].shape == (4, 6, 4, 5)
    assert np.array_equal(ds["sst"].values[:, np.isfinite(v)][0], v[np.isfinite(v)])


def test_cli_save_prior_is_the_library_fit_and_reloads(tmp_path, gen) -> None:
    """``--save-prior`` writes (atomically) the prior that :func:`prior_for` fits on the
    same field with the same seed, and that checkpoint drives a second run."""
    prior, v, path = _gappy_file(tmp_path, gen)
    saved, out = tmp_path / "priors" / "fit.pt", tmp_path / "out.nc"
    base = ["impute", str(path), "--var", "sst", "--samples", "2", "--out", str(out)]
    assert main([*base, "--save-prior", str(saved)]) == 0
    assert sorted(p.name for p in saved.parent.iterdir()) == ["fit.pt"]  # no temp file left
    with xr.open_dataset(path) as ds:
        ref = prior_for(field_data(ds["sst"].load()), None, "sst", gen(0)).state_dict()
    got = torch.load(saved, weights_only=True)
    assert got.keys() == ref.keys()
    for k, val in ref.items():
        if torch.is_tensor(val):
            assert torch.equal(got[k], val), k
        else:
            assert got[k] == val, k
    assert main([*base, "--prior", str(saved)]) == 0


def test_replacement_inpainting_independent_prior_matches_marginal(gen) -> None:
    """With independent coordinates the missing entries are independent of the observed
    ones, so replacement inpainting is exact: missing samples ~ N(mu_m, Sigma_mm)."""
    from models.diffusion.oracles import GaussianDenoiser
    from models.diffusion.samplers import DDPM
    from models.diffusion.schedules import CosineVP

    mu = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 2.0, 1.0, 0.3], dtype=torch.float64)
    sampler = DDPM(GaussianDenoiser(mu, torch.diag(var), CosineVP()))
    x = torch.tensor([float("nan"), 7.0, float("nan"), -1.0], dtype=torch.float64)
    n = 4000
    out = guided_inpaint(sampler, x, n, steps=64, generator=gen(7))
    assert torch.equal(out[:, [1, 3]], x[[1, 3]].expand(n, 2))
    # MC: sd(mean) = sqrt(v/n); sd(var_hat) = v sqrt(2/n); 5 sd. Discretisation of a
    # 64-step DDPM on a Gaussian adds a small bias, covered by an extra 3 % of v.
    m, v = out[:, [0, 2]].mean(0), out[:, [0, 2]].var(0)
    assert torch.all((m - mu[[0, 2]]).abs() < 5 * (var[[0, 2]] / n).sqrt())
    assert torch.all((v - var[[0, 2]]).abs() < var[[0, 2]] * (5 * (2 / n) ** 0.5 + 0.03))


def test_season_index_monthly_and_annual() -> None:
    from assim.impute import season_index

    monthly = xr.DataArray(xr.date_range("2000-01-01", periods=30, freq="MS"), dims="time")
    g, n = season_index(monthly)
    assert n == 12 and list(g[:13]) == list(range(12)) + [0]
    annual = xr.DataArray(xr.date_range("2000-01-01", periods=30, freq="YS"), dims="time")
    g, n = season_index(annual)
    assert n == 1 and not g.any()


@pytest.mark.parametrize("method", ["twisted", "replacement"])
def test_diffusion_methods_keep_observed_entries_and_run_through_impute(gen, method) -> None:
    prior = _prior()
    da = _dataarray(prior, gen)
    v = da.values.copy()
    v[np.random.default_rng(1).random(v.shape) < 0.4] = np.nan
    da = da.copy(data=v)
    valid = np.ones(v.shape[1:], bool)  # the prior's 20 points (the "land" one imputed)
    ds = impute(da, prior, n=3, generator=gen(6), mask=valid, window=1, method=method, steps=8)
    obs = np.isfinite(v)
    for k in range(3):
        assert np.array_equal(ds["sst"].values[k][obs], v[obs])
    imp = ds["imputed"].values.astype(bool)
    assert np.all(np.isfinite(ds["sst"].values[:, imp]))
    assert {"twisted": "twisted SMC", "replacement": "replacement"}[method] in ds.attrs["method"]
    with pytest.raises(InputError, match="unknown imputation method"):
        impute_array(prior, torch.zeros(2, 20), torch.zeros(2), 2, method="magic")


def test_twisted_impute_array_is_twisted_inpaint_on_the_oracle_and_near_exact(gen) -> None:
    """Two code paths, one answer: impute_array(method="twisted") is twisted_inpaint on
    the standardised window under gaussian_diffusion_sampler, destandardised, bit for
    bit. Its weighted mean is within 5 ESS-based s.e. of the exact conditional mean
    (plus the chain's discretisation gap, from chain_moments)."""
    from assim.impute import gaussian_diffusion_sampler
    from assim.smoother import twisted_inpaint
    from models.diffusion.oracles import chain_moments

    prior = _prior()
    groups = torch.tensor([0, 1])
    vals = prior.destandardize(prior.window.sample(1, 2, gen(1))[0], groups)
    vals[0, :9] = vals[1, 6:15] = float("nan")
    n, part, steps = 4, 256, 32
    smp, mean = impute_array(prior, vals, groups, n, gen(2), 2, "twisted", steps, part)
    z = prior.standardize(vals, groups)
    sampler = gaussian_diffusion_sampler(prior, 2)
    res = twisted_inpaint(sampler, z, n, steps, gen(2), particles=part, eigenbasis=True)
    assert torch.equal(smp[:, ~torch.isfinite(vals)], prior.destandardize(res.samples, groups)[
        :, ~torch.isfinite(vals)])  # fmt: skip
    w = torch.softmax(res.log_w, 0)
    ess = float(1 / (w * w).sum())
    zm = (w @ res.particles.reshape(part, -1)).reshape(z.shape)
    assert torch.allclose(mean[~torch.isfinite(vals)], prior.destandardize(zm, groups)[
        ~torch.isfinite(vals)])  # fmt: skip
    # closed forms in standardised units (noise 0.01 on the observed entries)
    cov = prior.window.dense_cov(2)
    obs = torch.isfinite(z).flatten()
    nz = torch.zeros(obs.numel(), dtype=torch.float64)
    zf = z.flatten()

    def cond(m, c):
        io, im = obs.nonzero().squeeze(1), (~obs).nonzero().squeeze(1)
        c_oo = c[io][:, io] + 1e-4 * torch.eye(io.numel(), dtype=torch.float64)
        g = torch.linalg.solve(c_oo, c[io][:, im]).T
        return m[im] + g @ (zf[io] - m[io]), c[im][:, im] - g @ c[io][:, im]

    m_ex, c_ex = cond(nz, cov)
    m_c, c_c = chain_moments(sampler, obs.numel(), steps, return_x0=False)
    a0 = float(sampler.schedule(torch.tensor(0.0, dtype=torch.float64))[0])
    gap = (cond(m_c / a0, c_c / a0**2)[0] - m_ex).abs()
    se = (torch.diagonal(c_ex) / ess).sqrt()
    assert ess > 0.25 * part
    assert bool(((zm.flatten()[~obs] - m_ex).abs() < 5 * se + gap).all())


def test_cli_twisted_method(tmp_path, gen, capsys) -> None:
    prior = _prior()
    da = _dataarray(prior, gen)
    v = da.values.copy()
    v[2, 1:3, 1:4] = np.nan
    path, out = tmp_path / "in.nc", tmp_path / "out.nc"
    da.copy(data=v).to_dataset().to_netcdf(path)
    base = ["impute", str(path), "--var", "sst", "--samples", "3", "--out", str(out)]
    assert main([*base, "--method", "twisted", "--steps", "1"]) == 2
    assert "--steps must be >= 2" in capsys.readouterr().err
    assert main([*base, "--method", "twisted", "--steps", "8", "--particles", "16"]) == 0
    assert "(twisted)" in capsys.readouterr().out
    ds = xr.open_dataset(out)
    obs = np.isfinite(v)
    assert "twisted SMC" in ds.attrs["method"]
    assert np.array_equal(ds["sst"].values[:, obs], np.broadcast_to(v[obs], (3, obs.sum())))
    assert np.all(np.isfinite(ds["sst"].values[:, 2, 1:3, 1:4]))


def test_cli_std_power_is_the_library_fit(tmp_path, gen, capsys) -> None:
    """``--std-power 0`` saves the prior that :func:`prior_for` fits with std_power=0;
    a bad value, or the flag with a checkpoint prior, is a clear error."""
    _, _, path = _gappy_file(tmp_path, gen)
    saved, out = tmp_path / "p0.pt", tmp_path / "out.nc"
    base = ["impute", str(path), "--var", "sst", "--samples", "2", "--out", str(out)]
    assert main([*base, "--std-power", "0", "--save-prior", str(saved)]) == 0
    with xr.open_dataset(path) as ds:
        ref = prior_for(field_data(ds["sst"].load()), None, "sst", gen(0), std_power=0.0)
    got = torch.load(saved, weights_only=True)
    assert torch.equal(got["clim_std"], ref.state_dict()["clim_std"])
    assert bool((got["clim_std"] == got["clim_std"][0]).all())  # one common scale
    assert main([*base, "--std-power", "2"]) == 2
    assert "--std-power must be" in capsys.readouterr().err
    assert main([*base, "--std-power", "0", "--prior", str(saved)]) == 2
    assert "applies to a prior fitted here" in capsys.readouterr().err
