"""``assim.run``: the cycle loop against the exact Kalman filter, and its bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import assim
from assim.errors import InputError
from assim.filters.base import Ensemble
from assim.filters.kalman import KalmanFilter, kalman_filter
from assim.filters.pf import BootstrapPF
from assim.obs import GaussianNoise, Observation, Subset
from models.worlds.linear_gaussian import LinearGaussian

D = 4


def _model():
    g = torch.Generator().manual_seed(0)
    A = 0.8 * torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(
        D, D, generator=g, dtype=torch.float64
    )
    b = torch.linspace(-0.2, 0.3, D, dtype=torch.float64)
    Q = 0.3 * torch.eye(D, dtype=torch.float64)
    world = LinearGaussian(A, b, Q)
    obs = Observation(Subset(every=2), GaussianNoise(std=0.7))
    ys = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ys[3] = float("nan")
    return world, obs, ys


@pytest.mark.parametrize("steps", [1, 2])
def test_run_with_kalman_equals_the_kalman_filter(steps, device):
    world, obs, ys = _model()
    A, b, Q = world.A, world.b, world.Q
    # `steps` world steps per cycle = one step of the composed linear-Gaussian map
    A2, b2, Q2 = A, b, Q
    for _ in range(steps - 1):
        A2, b2, Q2 = A @ A2, A @ b2 + b, A @ Q2 @ A.T + Q
    m0, P0 = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    H = obs.operator.matrix((D,), dtype=torch.float64)
    kf = kalman_filter(A2, b2, Q2, H, obs.noise.covariance(2), m0, P0, ys)
    truth = torch.linspace(-1, 1, 6 * D, dtype=torch.float64).reshape(6, D)
    ds = assim.run(
        world,
        KalmanFilter(m0, P0),
        ys.to(device),
        obs,
        torch.zeros(1, D, dtype=torch.float64, device=device),
        truth=truth.to(device),  # on the device too (a GPU run found it compared on CPU)
        steps_per_cycle=steps,
        progress=False,
    )
    rmse = (kf.means - truth).pow(2).mean(1).sqrt()
    np.testing.assert_allclose(ds["rmse"].values, rmse.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ds["mean"].values, kf.means.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        ds["std"].values, torch.diagonal(kf.covs, dim1=1, dim2=2).sqrt().numpy(), rtol=1e-10
    )
    np.testing.assert_allclose(ds["log_z"].values, kf.log_z.numpy(), rtol=1e-10, atol=1e-12)
    assert ds["skipped"].values.tolist() == [0, 0, 0, 1, 0, 0]
    assert ds.attrs["skipped_cycles"] == 1 and ds.attrs["method"] == "kalman"
    np.testing.assert_allclose(
        ds["model_time"].values, np.arange(1, 7) * steps * world.dt, rtol=1e-12
    )


def test_run_pf_records_everything(gen):
    world, obs, ys = _model()
    truth = torch.randn(6, D, generator=gen(1), dtype=torch.float64)
    x0 = torch.randn(300, D, generator=gen(2), dtype=torch.float64)
    ds = assim.run(
        world,
        BootstrapPF(threshold=0.5),
        ys,
        obs,
        x0,
        truth=truth,
        generator=gen(3),
        keep_ensemble=True,
        progress=False,
    )
    assert ds["ensemble"].dims == ("time", "member", "x") and ds.sizes["member"] == 300
    assert ds["member"].attrs["standard_name"] == "realization"
    # mean / std / rmse are consistent with the stored weighted members
    w = np.exp(ds["log_w"].values)[..., None]
    mean = (w * ds["ensemble"].values).sum(1)
    np.testing.assert_allclose(ds["mean"].values, mean, rtol=1e-5, atol=1e-5)
    rmse = np.sqrt(((ds["mean"].values - truth.numpy()) ** 2).mean(1))
    np.testing.assert_allclose(ds["rmse"].values, rmse, rtol=1e-10)
    np.testing.assert_allclose(
        ds["spread"].values, np.sqrt((ds["std"].values ** 2).mean(1)), rtol=1e-10
    )
    # the all-NaN cycle is skipped: evidence 0, weights untouched, ESS reported
    assert ds["skipped"].values[3] == 1 and ds["log_z"].values[3] == 0.0
    assert np.isfinite(ds["log_z"].values).all() and (ds["ess"].values > 1).all()
    assert ds["resampled"].values[3] == 0
    np.testing.assert_allclose(ds["log_w"].values[3], ds["log_w"].values[2])


def test_run_accepts_an_xarray_observation_dataset():
    import xarray as xr

    world, obs, ys = _model()
    times = np.arange(1, 7) * 0.5
    obs_ds = xr.Dataset(
        {"y": (("time", "obs"), ys.numpy())}, coords={"model_time": ("time", times)}
    )
    ds = assim.run(
        world,
        KalmanFilter(),
        obs_ds,
        obs,
        torch.randn(50, D, dtype=torch.float64),
        progress=False,
    )
    np.testing.assert_allclose(ds["model_time"].values, times)


def test_run_rejects_mis_shaped_input():
    world, obs, ys = _model()
    x0 = torch.zeros(10, D, dtype=torch.float64)
    with pytest.raises(InputError, match="entries per cycle"):
        assim.run(world, BootstrapPF(), ys[:, :1], obs, x0, progress=False)
    with pytest.raises(InputError, match="truth must be"):
        assim.run(world, BootstrapPF(), ys, obs, x0, truth=torch.zeros(5, D), progress=False)
    with pytest.raises(InputError, match="state shape"):
        assim.run(world, BootstrapPF(), ys, obs, torch.zeros(10, 3), progress=False)
    with pytest.raises(InputError, match="Kalman filter needs a linear-Gaussian world"):

        class NotLinear:
            state_shape, dt = (D,), 1.0

            def step(self, x, generator=None):
                return x

        assim.run(NotLinear(), KalmanFilter(), ys, obs, Ensemble(x0), progress=False)
