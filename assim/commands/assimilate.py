"""``assim assimilate --obs OBS.nc --world physical:l96 --method etkf --members 40 --out A.nc``.

Runs a filter over the observations of ``assim observe`` and writes a CF netCDF with
the analysis mean/std, spread, ESS, log-evidence increments, skipped/resampled flags
per cycle (and ``rmse`` with ``--truth``; members with ``--keep-ensemble``).

Methods: ``kalman`` (linear-Gaussian worlds only), ``enkf`` (stochastic, perturbed
observations), ``etkf`` (= ``enkf-sqrt``), ``enkf-n`` (finite-size EnKF, adaptive
inflation), ``letkf``, ``pf`` (bootstrap), ``dpf`` (the
diffusion particle filter, :mod:`assim.filters.dpf`; diffusion worlds only; localised
when ``--radius`` is given). Options come from ``--config FILE.toml`` (top-level keys,
or a table named after the method) and are overridden by flags: ``--inflation --rtps
--radius`` (ensemble Kalman), ``--threshold --resample --jitter --reg`` (pf),
``--twist --threshold --resample --radius`` (dpf).

The world is ``physical:<system>`` (the simulator of the truth, with its parameters
and time step read from the observation file, plus ``--model-noise`` additive
Gaussian noise per step) or a world-model checkpoint (a path or a shipped name such as
``l96``); every ensemble method runs with either. ``--diffusion-steps`` and ``--q``
(model-error std) reconfigure a learned diffusion world at run time (no retraining).
The number of world steps per cycle follows from the observation times.

Diagnostics: the dpf adds, per cycle, ``min_inner_ess`` (smallest ESS inside the
diffusion chain), ``inner_resamples`` and, localised, ``mean_local_ess``; ``ess`` is
the outer ESS and ``log_z`` the log-evidence increment. With ``--truth`` the rank
histogram of the truth in the (equally weighted, systematically resampled) analysis
ensemble is stored (``rank_counts``, attribute ``rank_histogram_pvalue``) and drawn
to ``--plot`` (default: ``<out>_rank.png`` next to the output; ``--plot none``: no
figure). The initial ensemble is climatological
(``--init climate``: random states spun up for 10 time units) or the truth's state at
the start plus ``N(0, init_std^2)`` (``--init truth``, DAPPER's convention).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from assim.commands._common import add_device, add_seed
from assim.errors import InputError

METHODS = ("kalman", "enkf", "etkf", "enkf-sqrt", "enkf-n", "letkf", "pf", "dpf")
TWISTS = ("gaussian", "dps", "none", "dps_only")
_PF_KEYS = {"threshold", "resample", "jitter", "jitter_mode", "jitter_all", "reg"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--obs", required=True, help="observation netCDF from 'assim observe'")
    parser.add_argument(
        "--world", required=True, help="physical:l96|l63|kolmogorov or a checkpoint"
    )
    parser.add_argument("--method", required=True, choices=METHODS, help="filter")
    parser.add_argument("--members", type=int, required=True, help="ensemble size / particles")
    parser.add_argument("--truth", default=None, help="truth netCDF: adds rmse per cycle")
    parser.add_argument("--config", default=None, help="TOML file with method options")
    parser.add_argument("--inflation", type=float, default=None, help="multiplicative inflation")
    parser.add_argument("--rtps", type=float, default=None, help="RTPS relaxation in [0, 1]")
    parser.add_argument(
        "--radius", type=float, default=None, help="LETKF / local dpf localisation radius"
    )
    parser.add_argument(
        "--twist", choices=TWISTS, default=None, help="dpf guidance (dps_only: biased)"
    )
    parser.add_argument(
        "--diffusion-steps", type=int, default=None, help="learned world: diffusion steps/step"
    )
    parser.add_argument(
        "--q", type=float, default=None, help="learned world: model-error std (state units)"
    )
    parser.add_argument(
        "--adapt-q", type=float, default=None, help="dpf: re-estimate q each cycle (EMA weight)"
    )
    parser.add_argument(
        "--reuse-denoised",
        action="store_const",
        const=True,
        default=None,
        help="local dpf: reuse ancestors' denoised states after local resampling (faster)",
    )
    parser.add_argument(
        "--moves", type=int, default=None, help="dpf: exact pCN MCMC moves after the last step"
    )
    parser.add_argument(
        "--hybrid", type=float, default=None, help="local dpf: likelihood share of an LETKF step"
    )
    parser.add_argument(
        "--spread-factor",
        type=float,
        default=None,
        help="local dpf: analysis anomalies times this factor in (0, 1] (1: off)",
    )
    parser.add_argument("--threshold", type=float, default=None, help="pf: resample if ESS<t*N")
    parser.add_argument("--resample", default=None, help="pf: systematic|stratified|residual|...")
    parser.add_argument("--jitter", type=float, default=None, help="pf: regularisation scale")
    parser.add_argument(
        "--reg", type=float, default=None, help="pf: DAPPER reg (jitter = reg N^(-1/(d+4)))"
    )
    parser.add_argument(
        "--model-noise", type=float, default=0.0, help="physical world: additive noise std/step"
    )
    parser.add_argument("--init", choices=("climate", "truth"), default="climate")
    parser.add_argument("--init-std", type=float, default=0.5, help="--init truth: noise std")
    parser.add_argument("--keep-ensemble", action="store_true", help="store all members")
    parser.add_argument(
        "--plot", default=None, help="rank-histogram PNG (default <out>_rank.png; 'none': off)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="analysis netCDF to write")
    add_device(parser)
    add_seed(parser)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from ``--config`` overridden by the flags that were given."""
    opts: dict[str, Any] = {}
    if args.config:
        import tomllib

        try:
            with open(args.config, "rb") as fh:
                cfg = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"--config {args.config}: cannot read TOML ({exc})") from exc
        opts.update({k: v for k, v in cfg.items() if not isinstance(v, dict)})
        opts.update(cfg.get(args.method, {}))
    keys = ("inflation", "rtps", "radius", "threshold", "resample", "jitter", "reg", "twist",
            "adapt_q", "reuse_denoised", "moves", "hybrid", "spread_factor")  # fmt: skip
    for key in keys:
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    return opts


def make_method(method: str, opts: dict[str, Any], world: Any = None):
    """The filter object for ``method`` with ``opts`` (``world``: for the dpf)."""
    if "twist" in opts and method != "dpf":
        raise InputError(f"--twist applies to --method dpf only, not {method}")
    if method == "dpf":
        from assim.filters.dpf import make_dpf

        if world is not None and not hasattr(world, "transition_sampler"):
            raise InputError(
                f"--method dpf needs a diffusion world (a learned checkpoint with "
                f"transition_sampler), got {type(world).__name__}"
            )
        return make_dpf(world, **opts)
    if method == "kalman":
        if opts:
            raise InputError(f"method kalman takes no options, got {sorted(opts)}")
        from assim.filters.kalman import KalmanFilter

        return KalmanFilter()
    if method == "pf":
        bad = sorted(set(opts) - _PF_KEYS)
        if bad:
            raise InputError(f"method pf does not take option(s) {bad}; allowed {sorted(_PF_KEYS)}")
        from assim.filters.pf import BootstrapPF

        return BootstrapPF(**opts)
    try:
        from assim.filters.enkf import make_filter
    except ImportError as exc:  # pragma: no cover - enkf.py ships with the package
        raise InputError(f"method {method}: ensemble Kalman filters unavailable ({exc})") from exc
    return make_filter(method, **opts)


def _world(args: argparse.Namespace, obs_attrs: dict, device):
    import json

    spec = args.world
    if spec.startswith("physical:"):
        from models.worlds.physical import physical_world

        name = spec.split(":", 1)[1]
        kw: dict[str, Any] = {"noise_std": float(args.model_noise)}
        if obs_attrs.get("truth_system") == name:
            params = json.loads(obs_attrs.get("truth_params", "{}"))
            kw.update({k: v for k, v in params.items() if k not in ("dt",)})
            if "truth_dt" in obs_attrs:
                kw["dt"] = float(obs_attrs["truth_dt"])
            if "truth_substeps" in obs_attrs:
                kw["n_substeps"] = int(obs_attrs["truth_substeps"])
        try:
            return physical_world(spec, **kw)
        except (ValueError, TypeError) as exc:
            raise InputError(f"--world {spec}: {exc}") from exc
    if args.model_noise:
        raise InputError("--model-noise applies to physical:<system> worlds only")
    from assim.commands.forecast import load_world

    return load_world(spec, device)


def _steps_per_cycle(model_time, dt: float, source: str) -> int:
    import numpy as np

    if model_time is None or len(model_time) < 2:
        return 1
    gaps = np.diff(np.asarray(model_time, dtype=np.float64))
    steps = gaps / dt
    k = int(round(float(steps[0])))
    if k < 1 or not np.allclose(steps, k, rtol=0, atol=1e-6 * max(1, k)):
        raise InputError(
            f"{source}: observation times are not evenly spaced multiples of the world "
            f"step dt={dt} (gaps {np.unique(np.round(gaps, 9))[:5]})"
        )
    return k


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch

    from assim.commands.observe import observation_from_attrs, truth_variable
    from assim.io import read_dataset, write_dataset
    from assim.runner import run as run_filter
    from models.device import resolve_device

    if args.members < 1:
        raise InputError(f"--members must be >= 1, got {args.members}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    ods = read_dataset(args.obs, var="y")
    obs = observation_from_attrs(ods, args.obs)
    world = _world(args, dict(ods.attrs), device)
    _configure_world(world, args)
    filt = make_method(args.method, method_options(args), world)
    if args.method == "kalman" and not all(hasattr(world, a) for a in ("A", "b", "Q")):
        raise InputError(f"--method kalman needs a linear-Gaussian world; {args.world} is not")
    state_shape = tuple(world.state_shape)
    mt = ods["model_time"].values if "model_time" in ods.coords else None
    steps = _steps_per_cycle(mt, float(world.dt), args.obs)
    gen = torch.Generator().manual_seed(int(args.seed))
    dtype = _world_dtype(world)

    truth = truth_x0 = None
    if args.truth:
        tds = read_dataset(args.truth)
        var = truth_variable(tds, args.truth, ods.attrs.get("truth_variable"))
        if tuple(tds[var].shape[1:]) != state_shape:
            raise InputError(
                f"{args.truth}: state shape {tuple(tds[var].shape[1:])} does not match the "
                f"world's {state_shape}"
            )
        if mt is not None and "model_time" in tds.coords:
            t_all = tds["model_time"].values
            pos = np.searchsorted(t_all, mt)
            ok = (pos < len(t_all)) & np.isclose(t_all[np.minimum(pos, len(t_all) - 1)], mt)
            if not ok.all():
                raise InputError(f"{args.truth}: does not contain the observation times")
        else:
            pos = ods["truth_index"].values
        truth = tds[var].values[pos]
        if pos[0] - steps >= 0:
            truth_x0 = tds[var].values[pos[0] - steps]
    if args.init == "truth":
        if truth_x0 is None:
            raise InputError(
                "--init truth needs --truth with the state one cycle before the first observation"
            )
        x0 = torch.as_tensor(truth_x0, dtype=dtype, device=device)
        noise = torch.randn((args.members, *state_shape), generator=gen, dtype=dtype)
        ens0 = x0 + args.init_std * noise.to(device)
    else:
        sim = getattr(world, "simulator", None)
        if sim is None or not hasattr(sim, "random_state"):
            raise InputError(
                f"--init climate needs a physical world; use --init truth with {args.world}"
            )
        ens0 = sim.random_state(args.members, gen, dtype=dtype, device=device)
        for _ in range(math.ceil(10.0 / float(world.dt))):
            ens0 = world.step(ens0, generator=gen)
    dims = json.loads(ods.attrs["state_dims"]) if "state_dims" in ods.attrs else None
    if dims is not None and len(dims) != len(state_shape):
        dims = None
    from assim.commands._assim_diag import Recorder, plot_path, rank_plot

    record = Recorder(filt, truth, int(args.seed))
    ds = run_filter(
        world,
        filt,
        ods,
        obs,
        ens0,
        truth=truth,
        generator=gen,
        steps_per_cycle=steps,
        keep_ensemble=args.keep_ensemble,
        progress=not args.no_progress,
        dims=dims,
        attrs={
            "obs_file": str(args.obs),
            "truth_file": str(args.truth or ""),
            "world_spec": str(args.world),
            "seed": int(args.seed),
            "init": args.init,
            "operator": str(ods.attrs["operator"]),
            "sigma": float(ods.attrs["sigma"]),
        },
    )
    record.add_to(ds)
    if truth is not None:
        ds["rank_counts"] = (
            "rank",
            record.rank_counts,
            {"long_name": "rank of the truth in the analysis ensemble, summed over cycles"},
        )
        ds.attrs["rank_histogram_pvalue"] = record.rank_pvalue()
    path = write_dataset(ds, args.out)
    line = f"wrote {path}: {ds.sizes['time']} cycles, {ds.attrs['cycles_per_second']:.1f} cycles/s"
    if truth is not None:
        line += f", rmse (all cycles) {float(np.nanmean(ds['rmse'].values)):.4f}"
        plot = plot_path(args.plot, path)
        if plot is not None:
            rank_plot(record.rank_counts, ds.attrs["rank_histogram_pvalue"], plot, args.method)
            line += f", rank histogram {plot}"
    print(line)
    return 0


def _configure_world(world: Any, args: argparse.Namespace) -> None:
    """Apply ``--diffusion-steps`` / ``--q`` to a learned diffusion world."""
    opts = {"steps": args.diffusion_steps, "q": args.q}
    opts = {k: v for k, v in opts.items() if v is not None}
    if not opts:
        return
    if not hasattr(world, "configure"):
        raise InputError(
            f"--diffusion-steps/--q need a learned diffusion world (checkpoint); {args.world} "
            "has no diffusion chain (use --model-noise for a physical world)"
        )
    try:
        world.configure(**opts)
        if getattr(world, "history", 1) == 1 and hasattr(world, "state_mean"):
            # the chain checks q against the schedule's noise range: fail now, not mid-run
            world.transition_sampler(world.state_mean.unsqueeze(0))
    except ValueError as exc:
        raise InputError(f"--diffusion-steps/--q: {exc}") from exc


def _world_dtype(world: Any):
    """float64 for simulators; a learned world's own floating dtype (float32 usually)."""
    import torch

    if isinstance(world, torch.nn.Module):
        for t in (*world.parameters(), *world.buffers()):
            if t.is_floating_point():
                return t.dtype
    return torch.float64
