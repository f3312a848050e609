"""``assim.run``: the forecast/analysis loop over observation cycles (DESIGN.md §2).

For each cycle ``k = 1..K`` the ensemble is forecast ``steps_per_cycle`` world steps
(the last one inside ``filt.cycle``, so that the diffusion particle filter can fuse
it with the analysis) and ``y_k`` is assimilated. The result is a CF dataset (built
with :mod:`assim.io`) with, per cycle: the analysis ``mean`` and ``std`` per grid
point, ``spread`` (``sqrt`` of the spatially averaged variance, DAPPER's definition),
``ess`` (after the update, before resampling), ``log_z`` (evidence increment; NaN
where the method has none), ``skipped`` (no observed entry), ``resampled``,
``collapsed``, ``inflation``; ``rmse`` (spatial RMS error of the mean) when a truth is
given; and, with ``keep_ensemble``, the members ``ensemble`` (time, member, *S) with
their ``log_w``.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble, Filter

_INFO_KEYS = ("ess", "log_z", "inflation")
_FLAG_KEYS = ("skipped", "resampled", "collapsed")


def _observations(observations: Any, device, dtype) -> tuple[Tensor, Any]:
    """``(ys (K, m), times or None)`` from a tensor/array or an xarray object."""
    times = None
    if hasattr(observations, "data_vars"):  # xarray.Dataset
        from assim.io import choose_variable

        observations = observations[choose_variable(observations, "observations", "y")]
    if hasattr(observations, "dims"):  # xarray.DataArray
        if "model_time" in observations.coords:
            times = observations["model_time"].values
        elif "time" in observations.coords:
            times = observations["time"].values
        observations = observations.values
    if not torch.is_tensor(observations):
        observations = torch.as_tensor(np.asarray(observations))
    ys = observations
    if ys.dim() != 2:
        raise InputError(f"observations must be (K cycles, m), got shape {tuple(ys.shape)}")
    return ys.to(device=device, dtype=dtype), times


def run(
    world: Any,
    filt: Filter,
    observations: Any,
    obs: Any,
    ensemble0: Ensemble | Tensor,
    *,
    truth: Any = None,
    generator: torch.Generator | None = None,
    steps_per_cycle: int = 1,
    keep_ensemble: bool = False,
    progress: bool = True,
    times: Any = None,
    dims: Sequence[str] | None = None,
    attrs: dict[str, Any] | None = None,
):
    """Run ``filt`` over ``observations`` ``(K, m)`` (tensor, array, or an xarray
    ``Dataset`` with variable ``y(time, obs)`` / a ``DataArray``) from ``ensemble0``
    (``Ensemble`` or members ``(N, *S)``) and return an ``xarray.Dataset``.

    ``truth`` ``(K, *S)`` is the true state at each cycle (for ``rmse``); ``times``
    the model time of each cycle (default: the observations' ``model_time`` / ``time``
    coordinate, else ``k * steps_per_cycle * world.dt``). A filter with an
    ``initialize(ensemble)`` method (the Kalman filter) converts ``ensemble0`` first.
    """
    from tqdm.auto import tqdm

    from assim import io

    ens = ensemble0 if isinstance(ensemble0, Ensemble) else Ensemble(torch.as_tensor(ensemble0))
    if hasattr(filt, "initialize"):
        ens = filt.initialize(ens)
    x0 = ens.x
    state_shape = tuple(x0.shape[1:])
    if tuple(getattr(world, "state_shape", state_shape)) != state_shape:
        raise InputError(
            f"initial ensemble has state shape {state_shape} but the world expects "
            f"{tuple(world.state_shape)}"
        )
    if int(steps_per_cycle) != steps_per_cycle or steps_per_cycle < 1:
        raise InputError(f"steps_per_cycle must be a positive integer, got {steps_per_cycle!r}")
    ys, obs_times = _observations(observations, x0.device, x0.dtype)
    K = ys.shape[0]
    m = obs.dim(state_shape) if hasattr(obs, "dim") else ys.shape[1]
    if ys.shape[1] != m:
        raise InputError(
            f"observations have {ys.shape[1]} entries per cycle but the operator "
            f"{getattr(obs.operator, 'spec', obs)} gives {m} for state shape {state_shape}"
        )
    if truth is not None:
        truth = torch.as_tensor(np.asarray(truth) if not torch.is_tensor(truth) else truth).cpu()
        if tuple(truth.shape) != (K, *state_shape):
            raise InputError(
                f"truth must be (K={K}, {', '.join(map(str, state_shape))}) to match the "
                f"cycles, got {tuple(truth.shape)}"
            )
    if times is None:
        times = obs_times
    if times is None:
        times = np.arange(1, K + 1) * steps_per_cycle * float(getattr(world, "dt", 1.0))
    dims = tuple(dims) if dims is not None else io.spatial_dims(state_shape)

    mean = np.empty((K, *state_shape))
    std = np.empty((K, *state_shape))
    scalars = {k: np.full(K, np.nan) for k in (*_INFO_KEYS, "spread", "rmse")}
    flags = {k: np.zeros(K, dtype=np.int8) for k in _FLAG_KEYS}
    members = log_ws = None
    if keep_ensemble:
        members = np.empty((K, ens.size, *state_shape), dtype=np.float32)
        log_ws = np.empty((K, ens.size))
    t_start = _time.perf_counter()
    with torch.no_grad():
        for k in tqdm(range(K), disable=not progress, desc=f"assim {filt.name}", unit="cycle"):
            for _ in range(steps_per_cycle - 1):
                ens = _forecast_only(filt, world, ens, obs, generator)
            ens, info = filt.cycle(world, ens, ys[k], obs, generator)
            mu, var = ens.mean(), ens.var()
            mean[k] = mu.double().cpu().numpy()
            std[k] = var.clamp_min(0).sqrt().double().cpu().numpy()
            scalars["spread"][k] = math.sqrt(float(var.double().mean().clamp_min(0)))
            for key in _INFO_KEYS:
                v = info.get(key, math.nan)
                scalars[key][k] = math.nan if v is None else float(v)
            for key in _FLAG_KEYS:
                flags[key][k] = int(bool(info.get(key, False)))
            if truth is not None:
                err = mu.double().cpu() - truth[k].double()
                scalars["rmse"][k] = float(err.pow(2).mean().sqrt())
            if keep_ensemble:
                members[k] = ens.x.float().cpu().numpy()
                log_ws[k] = ens.log_w.double().cpu().numpy()
    time_taken = _time.perf_counter() - t_start

    ds = io.trajectory_dataset(mean, times, dims, name="mean", long_name="analysis mean")
    ds["std"] = (("time", *dims), std, {"long_name": "analysis standard deviation", "units": "1"})
    descr = {
        "spread": "sqrt of the spatial mean of the analysis variance",
        "ess": "effective sample size after the update, before resampling",
        "log_z": "log evidence increment log p(y_k | y_1:k-1)",
        "inflation": "multiplicative inflation used",
        "rmse": "spatial RMS error of the analysis mean against the truth",
    }
    for key, values in scalars.items():
        if key == "rmse" and truth is None:
            continue
        ds[key] = ("time", values, {"long_name": descr[key], "units": "1"})
    for key, values in flags.items():
        ds[key] = ("time", values, {"long_name": f"cycle {key} (1 = yes)", "units": "1"})
    if keep_ensemble:
        ds["ensemble"] = (
            ("time", "member", *dims),
            members,
            {"long_name": "analysis ensemble members", "units": "1"},
        )
        ds["log_w"] = (("time", "member"), log_ws, {"long_name": "normalised log-weights"})
        ds = ds.assign_coords(member=io.member_coordinate(members.shape[1]))
    params = {k: v for k, v in vars(filt).items() if isinstance(v, int | float | str | bool)}
    ds.attrs.update(
        {
            "method": filt.name,
            "method_params": repr(params),
            "world": repr(world),
            "observation": repr(obs),
            "members": int(x0.shape[0]),
            "steps_per_cycle": int(steps_per_cycle),
            "cycles": int(K),
            "skipped_cycles": int(flags["skipped"].sum()),
            "wall_seconds": float(time_taken),
            "cycles_per_second": float(K / max(time_taken, 1e-12)),
            **dict(attrs or {}),
        }
    )
    return ds


def _forecast_only(filt: Filter, world: Any, ens: Ensemble, obs: Any, generator) -> Ensemble:
    """An intermediate world step (no observation): plain ensembles step directly,
    other states (the Kalman filter's Gaussian) through a cycle without ``y``."""
    if type(ens) is Ensemble:
        return Ensemble(world.step(ens.x, generator=generator), ens.log_w)
    return filt.cycle(world, ens, None, obs, generator)[0]
