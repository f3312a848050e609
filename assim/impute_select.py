"""Choices of the imputation prior that need whole refits, made by held-out imputation of
the fit period (:func:`select_std_power`), never by the fields being imputed."""

from __future__ import annotations

import torch
from torch import Tensor

from assim.errors import InputError
from assim.impute_holdout import holdout_mask
from assim.metrics import crps_ensemble

__all__ = ["STD_POWERS", "select_std_power"]

STD_POWERS = (1.0, 0.5, 0.0)


def select_std_power(
    values: Tensor,
    groups: Tensor,
    lat: Tensor,
    lon: Tensor,
    n_groups: int | None = None,
    candidates: tuple[float, ...] = STD_POWERS,
    generator: torch.Generator | None = None,
    n_members: int = 32,
    uniform_cv: float = 0.2,
    **fit_kwargs,
) -> tuple[float, dict[float, float]]:
    """The standardisation power ``p`` of :func:`~assim.impute_prior.fit_field_prior`
    with the lowest held-out CRPS: for each candidate a prior is fitted on the first
    75 % of the fit fields ``values`` ``(T, P)`` and imputes the last 25 % with 30 % of
    the entries hidden at random plus a contiguous run of a sixth of the points at every
    step (the same masks for every candidate); the fair CRPS of ``n_members`` samples is
    averaged over the hidden entries in physical units (the candidates standardise
    differently, so only physical units compare). Returns ``(p, {p: crps})``.

    Where the pooled anomaly sd ``s`` varies by less than ``uniform_cv`` (coefficient of
    variation over the points) the candidates are nearly the same model: ``p = 1`` is
    returned without refits and with empty scores (e.g. homogeneous turbulence)."""
    from assim.baselines import grouped_climatology
    from assim.impute_prior import fit_field_prior

    _, sd = grouped_climatology(values.double(), groups, n_groups)
    if float(sd.std() / sd.mean()) < uniform_cv:
        return 1.0, {}
    t = values.shape[0]
    n_tr = max(2, int(0.75 * t))
    if t - n_tr < 1:
        raise InputError(f"need held-out fit fields to choose std_power, got T = {t}")
    seed = 0 if generator is None else int(generator.initial_seed())
    g = torch.Generator(device=values.device).manual_seed(seed)
    val = values[n_tr:].double()
    hid = holdout_mask(val, g) & torch.isfinite(val)
    masked = val.masked_fill(hid, float("nan"))
    scores = {}
    for cand in candidates:
        gc = torch.Generator(device=values.device).manual_seed(seed)
        prior = fit_field_prior(
            values[:n_tr], groups[:n_tr], lat, lon, n_groups, generator=gc,
            std_power=float(cand), **fit_kwargs,
        )  # fmt: skip
        z = prior.standardize(masked, groups[n_tr:])
        smp, _ = prior.posterior(z, n_members, gc)
        x = prior.destandardize(smp, groups[n_tr:])
        scores[float(cand)] = float(crps_ensemble(x[:, hid], val[hid]).mean())
    return min(scores, key=scores.get), scores
