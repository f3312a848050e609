"""``assim impute IN.nc --var NAME --samples K [--prior CKPT|gaussian]
[--method exact|twisted|replacement] --out OUT.nc``: posterior samples of the missing
(NaN) entries of a (time, lat, lon) field.

``--method exact`` (default) samples the Gaussian prior's posterior in closed form;
``twisted`` runs twisted SMC through a DDPM chain of the same prior's exact denoiser
(:func:`assim.smoother.twisted_inpaint`); ``replacement`` is replacement inpainting
through that chain (biased; for comparison). ``--spread`` chooses how the exact
posterior's spread adapts to the observations (:meth:`assim.impute.FieldPrior.posterior`).
Fields on the periodic square (dims ``(time, y, x)``, coordinates in ``[0, 2 pi)``, e.g.
``assim simulate kolmogorov``) get Matérn kernels on the torus.

``--world CKPT`` (e.g. ``kolmogorov32``) fills the gaps dynamically instead: an ensemble
Kalman smoother that steps the members with the learned world
(:func:`assim.impute_world.impute_field`); the frames must be one world step apart on
the world's grid."""

from __future__ import annotations

import argparse

from assim.commands._common import add_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.nc", help="netCDF with a (time, lat, lon) field")
    parser.add_argument("--var", required=True, help="name of the field to impute")
    parser.add_argument("--samples", type=int, default=32, help="members K (default 32)")
    parser.add_argument(
        "--prior",
        default="gaussian",
        help="'gaussian' (fit the EOF + Matern space-time prior on IN.nc) or a prior "
        "checkpoint written by --save-prior / experiments/train_priors.py",
    )
    parser.add_argument(
        "--world",
        default=None,
        metavar="CKPT",
        help="a world checkpoint (path or shipped name, e.g. kolmogorov32): impute with the "
        "ensemble smoother through the world instead of the Gaussian prior",
    )
    parser.add_argument(
        "--radius", type=float, default=2.0, help="--world: localisation radius (grid units)"
    )
    parser.add_argument("--mask", default=None, help="variable of IN.nc: 1 = valid grid point")
    parser.add_argument("--level", type=float, default=0.9, help="interval level (0.9)")
    parser.add_argument(
        "--method",
        choices=("exact", "twisted", "replacement"),
        default="exact",
        help="exact Gaussian posterior (default), twisted SMC through the prior's diffusion "
        "chain, or replacement inpainting (biased)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="time steps per window (default 12 for exact, 1 for the diffusion methods, "
        "whose cost grows with (window x points)^2)",
    )
    parser.add_argument("--steps", type=int, default=64, help="diffusion steps (64)")
    parser.add_argument(
        "--particles", type=int, default=None, help="SMC particles (default max(K, 64))"
    )
    parser.add_argument(
        "--spread",
        choices=("fixed", "window", "local"),
        default=None,
        help="posterior spread model (default: the prior's own; 'local' for a prior fitted "
        "here): 'local' follows the innovations observed around each gap, 'window' one "
        "variance scale per window, 'fixed' the fitted prior as is",
    )
    parser.add_argument(
        "--std-power",
        default=None,
        help="prior fitted here: divide anomalies by s^p mean(s)^(1-p) of the per-point sd s "
        "(1, the default: standardised; 0: physical units, better where s changes sharply "
        "between neighbours) or 'holdout' (p in 1, 0.5, 0 by held-out CRPS; slower)",
    )
    parser.add_argument("--save-prior", default=None, help="write the fitted prior here")
    parser.add_argument("--out", required=True, metavar="OUT.nc", help="output netCDF")
    add_seed(parser)


def load_prior(spec: str):
    """``None`` for 'gaussian' (fit on the input), else a :class:`FieldPrior` checkpoint."""
    import os

    import torch

    from assim.errors import InputError
    from assim.impute import FieldPrior

    if spec == "gaussian":
        return None
    if not os.path.isfile(spec):
        raise InputError(f"--prior {spec}: file not found (expected 'gaussian' or a checkpoint)")
    try:
        sd = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"--prior {spec}: cannot read checkpoint ({exc})") from exc
    if not isinstance(sd, dict):
        raise InputError(f"--prior {spec}: not a prior checkpoint")
    return FieldPrior.from_state_dict(sd)


def read_field(path: str, var: str, mask_var: str | None):
    """The (time, lat, lon) DataArray and its valid-point mask (or ``None``)."""
    from assim import io
    from assim.errors import InputError

    ds = io.read_dataset(path, var=var)
    da = ds[var]
    if da.ndim != 3:
        raise InputError(f"{path}: variable {var!r} has dims {da.dims}; expected (time, lat, lon)")
    mask = None
    name = mask_var or ("mask" if "mask" in ds.data_vars else None)
    if name is not None:
        if name not in ds.data_vars:
            raise InputError(f"{path}: mask variable {name!r} not found")
        mask = ds[name].values
        if mask.shape != da.shape[1:]:
            raise InputError(
                f"{path}: mask {name!r} has shape {mask.shape}, but {var!r} has grid {da.shape[1:]}"
            )
    return da, mask


def _std_power(text: str) -> float | str:
    """``--std-power``: a number in [0, 1] or ``holdout``."""
    from assim.errors import InputError

    if text == "holdout":
        return text
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise InputError(f"--std-power must be a number in [0, 1] or 'holdout', got {text!r}")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from assim import io
    from assim.errors import InputError
    from assim.impute import field_data, impute, prior_for
    from models.checkpoint import save_atomic

    if args.samples < 2:
        raise InputError(f"--samples must be >= 2, got {args.samples}")
    if args.steps < 2:
        raise InputError(f"--steps must be >= 2, got {args.steps}")
    if args.particles is not None and args.particles < 2:
        raise InputError(f"--particles must be >= 2, got {args.particles}")
    window = args.window if args.window is not None else (12 if args.method == "exact" else 1)
    if window < 1:
        raise InputError(f"--window must be >= 1, got {window}")
    da, mask = read_field(args.input, args.var, args.mask)
    if args.world is not None:
        return _run_world(args, da)
    prior = load_prior(args.prior)
    gen = torch.Generator().manual_seed(args.seed)
    fit_kw = {}
    if args.std_power is not None:
        if prior is not None:
            raise InputError("--std-power applies to a prior fitted here, not to --prior CKPT")
        fit_kw["std_power"] = _std_power(args.std_power)
    if prior is None:  # fitted here (not inside impute) so that --save-prior can keep it
        prior = prior_for(field_data(da, mask), None, args.var, gen, **fit_kw)
    if args.spread is not None:
        prior.spread = args.spread
    if args.save_prior:
        save_atomic(prior.state_dict(), args.save_prior)
    ds = impute(
        da,
        prior,
        args.samples,
        args.level,
        gen,
        mask,
        window,
        method=args.method,
        steps=args.steps,
        particles=args.particles,
    )
    io.write_dataset(ds, args.out)
    n_imp = int(ds["imputed"].sum())
    print(
        f"imputed {n_imp} values of {args.var!r} with {args.samples} members "
        f"({args.method}) -> {args.out}"
    )
    return 0


def _run_world(args: argparse.Namespace, da) -> int:
    """``--world``: the ensemble smoother through a learned world."""
    import torch

    import models
    from assim import io
    from assim.errors import InputError
    from assim.impute_world import impute_field

    try:
        world = models.load(args.world, device="cpu")
    except ValueError as exc:
        raise InputError(f"--world {args.world}: {exc}") from exc
    gen = torch.Generator().manual_seed(args.seed)
    ds = impute_field(da, world, args.samples, args.level, gen, radius=args.radius)
    io.write_dataset(ds, args.out)
    print(
        f"imputed {int(ds['imputed'].sum())} values of {args.var!r} with {args.samples} members "
        f"(ensemble smoother through {args.world}) -> {args.out}"
    )
    return 0
