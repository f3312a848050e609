"""The dynamical imputation column of ``bench_impute.py``: the ensemble Kalman smoother
of :mod:`assim.impute_world` with the shipped learned Kolmogorov world of the grid."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from experiments.impute_common import make_masks, scores

WORLD = "EnKS, learned world (ours, dynamical)"
WORLD_GRID = "2:0.75,2:1.5,2:2.5,3:1.5"  # taper radius : additive factor alpha
SPREAD_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0, 2.25, 2.5)


class WorldImputer:
    """The dynamical smoother of :mod:`assim.impute_world` with the shipped learned world
    of the grid, ``kolmogorov32`` or ``kolmogorov64`` (diffusion ``steps``, model error
    ``q``): initial ensemble = ``k``
    random frames of the fit period (climatology; no information about the test window),
    static covariance ``B`` = stationary covariance of the world's one-step errors on the
    fit period (:func:`assim.impute_world.forecast_error_cov`), Gaspari-Cohn taper, lag
    ``lag``. The last ``n_val`` fit frames are held out for :meth:`tune` (neither the
    pool of initial members nor ``B`` sees them), which picks the taper radius, the
    additive factor and the output spread factor."""

    def __init__(self, fit, shape, dt, k, lag, steps, q, n_val, log, device="cpu") -> None:
        import models
        from assim.impute_world import forecast_error_cov
        from models.device import resolve_device

        self.device = resolve_device(device)
        name = f"kolmogorov{shape[0]}"  # the shipped world of the grid (32² or 64²)
        self.world = models.load(name, device=self.device).configure(steps=steps, q=q)
        if abs(float(dt) - self.world.dt) > 1e-6 or tuple(shape) != self.world.state_shape:
            raise ValueError(
                f"frames every {dt} on grid {shape}; the world steps {self.world.dt} on "
                f"{self.world.state_shape}"
            )
        self.pool, self.val, self.shape = fit[:-n_val], fit[-n_val:], tuple(shape)
        frames = torch.from_numpy(self.pool).reshape(-1, *shape).to(self.device)
        t0 = time.time()
        g = torch.Generator(self.device).manual_seed(9)
        self.static = forecast_error_cov(self.world, frames, g)
        self.k, self.lag, self.config, self.radius = k, lag, None, None
        log(
            f"  world: dt {self.world.dt} diffusion steps {steps} q {q} lag {lag}; B: one-step "
            f"error sd {float(torch.diagonal(self.static).mean()) ** 0.5:.3f} "
            f"({time.time() - t0:.0f}s)"
        )

    def run(self, obs: np.ndarray, seed: int, config=None, radius=None, kind=None):
        """Samples ``(k, T, P)`` and mean ``(T, P)`` (numpy) of the NaN entries of ``obs``;
        ``kind`` (a mask kind of :meth:`tune`) applies the output spread chosen for it."""
        if config is None and kind is not None:
            config = dataclasses.replace(self.config, spread=self.spread_by_kind[kind])
        from assim.impute_world import ensemble_smoother, torus_taper, world_step

        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.pool), generator=g)[: self.k]
        x0 = torch.from_numpy(self.pool)[idx].to(self.device)
        if self.device.type != "cpu":  # the smoother draws on the device of its members
            g = torch.Generator(self.device).manual_seed(seed)
        taper = torus_taper(self.shape, radius or self.radius)
        smp, mean = ensemble_smoother(
            world_step(self.world), x0, torch.from_numpy(obs), config or self.config,
            self.static, taper, g,
        )  # fmt: skip
        smp, mean = smp.cpu().numpy(), mean.cpu().numpy()
        hid = ~np.isfinite(obs)
        smp[:, ~hid], mean[~hid] = obs[~hid], obs[~hid]  # observed entries bit for bit
        return smp, mean

    def tune(self, valid: np.ndarray, kinds: list[str], grid: str, log) -> None:
        """Choose the taper radius, ``additive`` and output ``spread`` on the held-out fit
        frames with mask seed 1000: for each radius/additive and each mask kind the
        ``spread`` whose 90 % coverage on that kind is closest to 0.90 (the centre of the
        target band, so that a shift between validation and test frames keeps it inside),
        then the radius/additive with the lowest CRPS averaged over the kinds. The spread
        is kept per mask kind: the smoother's under-dispersion depends on how much is
        hidden (one shared factor over-covered the 30 % mask and under-covered the box on
        64² validation frames), and a user knows the pattern of what is missing. ``spread``
        is applied after the run (it only rescales deviations from the mean), so each
        radius/additive runs once."""
        from assim.impute_world import SmootherConfig

        res = []
        for item in grid.split(","):
            radius, add = (float(v) for v in item.split(":"))
            cfg = SmootherConfig(additive=add, lag=self.lag)
            runs = []
            for kind in kinds:
                hid = make_masks(valid, len(self.val), kind, 1000)
                obs = self.val.copy()
                obs[hid] = np.nan
                smp, mean = self.run(obs, 1000, cfg, radius)
                runs.append((smp[:, hid], mean[hid], self.val[hid]))
            for c in SPREAD_GRID:
                sc = [scores(mn + c * (sm - mn), mn, y) for sm, mn, y in runs]
                crps, cov = [x["crps"] for x in sc], [x["cov"] for x in sc]
                rmse = [x["rmse"] for x in sc]
                res.append((radius, add, c, crps, cov))
                log(
                    f"  world tuning (held-out fit frames, mask seed 1000) radius {radius} "
                    f"additive {add} spread {c}: crps {' '.join(f'{v:.4f}' for v in crps)} "
                    f"rmse {' '.join(f'{v:.4f}' for v in rmse)} cov "
                    f"{' '.join(f'{v:.3f}' for v in cov)}"
                )
        central: dict = {}  # (radius, additive) -> per mask kind (coverage gap, spread, crps)
        for radius, add, c, crps, cov in res:
            per = central.setdefault((radius, add), [(np.inf, 1.0, np.inf)] * len(kinds))
            for i, (cr, cv) in enumerate(zip(crps, cov, strict=True)):
                if abs(cv - 0.9) < per[i][0]:
                    per[i] = (abs(cv - 0.9), c, cr)
        (radius, add), per = min(central.items(), key=lambda kv: np.mean([x[2] for x in kv[1]]))
        self.radius = radius
        self.spread_by_kind = {k: x[1] for k, x in zip(kinds, per, strict=True)}
        self.config = SmootherConfig(additive=add, lag=self.lag)
        log(f"  world: chosen radius {self.radius} {self.config} spread {self.spread_by_kind}")
