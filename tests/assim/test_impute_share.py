"""Per-point spread factor on the local share of the posterior variance
(:func:`assim.impute_holdout.scale_local_share`, ``fit_field_prior(spread_hetero="local"
| "resid")``): its two limits against the existing paths bit for bit, the moment
estimator of the factor, the residual share and the variance after scaling against the
closed form on a small Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from assim.errors import InputError
from assim.impute import FieldPrior, fit_field_prior
from assim.impute_holdout import fit_spread_sd, residual_share, scale_local_share
from assim.smoother import gaussian_conditional


def _grid(nlat: int = 4, nlon: int = 5):
    lat = torch.linspace(-20.0, 20.0, nlat, dtype=torch.float64)
    lon = torch.linspace(100.0, 190.0, nlon, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return la.flatten(), lo.flatten()


def _prior(rank: int = 0, length: float = 900.0, eof=None, **kw) -> FieldPrior:
    """Uniform EOFs (or the single normalised pattern ``eof``), Matérn residual."""
    la, lo = _grid()
    p = la.numel()
    ones = torch.ones(p, dtype=torch.float64)
    basis = torch.ones(p, rank, dtype=torch.float64) / math.sqrt(p)
    if eof is not None:
        basis = (eof / eof.norm())[:, None].double()
    lam, rho = torch.full((rank,), 2.0).double(), torch.full((rank,), 0.5).double()
    return FieldPrior(la, lo, ones[None] * 0, ones, basis, lam, rho, length, 0.05, 0.7, **kw)


def test_scale_local_share_limits_and_closed_form(device, gen) -> None:
    """share = 1: the whole-deviation factor ``mean + (smp - mean) sd`` bit for bit;
    share = 0: the samples unchanged bit for bit; otherwise the deviations are
    multiplied by ``sqrt((1 - share) + share sd^2)``."""
    g = gen(0, device)
    kw = dict(generator=g, device=device, dtype=torch.float64)
    smp, mean = torch.randn(6, 3, 9, **kw), torch.randn(3, 9, **kw)
    sd = torch.rand(9, **kw) * 1.5 + 0.5
    one = torch.ones(3, 9, device=device, dtype=torch.float64)
    zero = torch.zeros_like(one)
    assert torch.equal(scale_local_share(smp, mean, one, sd), mean + (smp - mean) * sd)
    assert torch.equal(scale_local_share(smp, mean, zero, sd), smp)
    share = torch.rand(3, 9, **kw)
    out = scale_local_share(smp, mean, share, sd)
    torch.testing.assert_close(out - mean, (smp - mean) * ((1 - share) + share * sd**2).sqrt())


def test_fit_spread_sd_limits_and_moment_equation() -> None:
    """``local_var = var`` reproduces the whole-deviation estimator bit for bit; sums that
    satisfy ``err2 = (1 - kappa) v + kappa s^2 v`` exactly (identity weights) return ``s``."""
    g = torch.Generator().manual_seed(1)
    p = 12
    var = torch.rand(p, generator=g, dtype=torch.float64) + 0.5
    err2 = torch.rand(p, generator=g, dtype=torch.float64) + 0.5
    w = torch.rand(p, p, generator=g, dtype=torch.float64)
    assert torch.equal(fit_spread_sd(w, err2, var, var.clone()), fit_spread_sd(w, err2, var))
    kappa = torch.rand(p, generator=g, dtype=torch.float64) * 0.8 + 0.1
    s = torch.linspace(0.6, 1.9, p, dtype=torch.float64)
    err2 = (1 - kappa) * var + kappa * s**2 * var
    eye = torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(fit_spread_sd(eye, err2, var, kappa * var), s)
    assert not torch.allclose(fit_spread_sd(eye, err2, var), s, rtol=0.05)


def _limit_case(gen, share: str, kappa: float):
    """Priors with the share path (``new``) and the path it must equal at ``kappa`` 0 / 1
    (``ref``: no factor / whole-deviation factor), and a half-observed window ``z``."""
    p = _grid()[0].numel()
    f = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    z = torch.randn(3, p, generator=gen(5), dtype=torch.float64)
    z[torch.rand(3, p, generator=gen(6), dtype=torch.float64) < 0.5] = float("nan")
    new = _prior(1, spread="local", spread_sd=f, spread_share=share)
    ref = _prior(1, spread="local", spread_sd=f if kappa else None)
    return new, ref, z


@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_share_path_limits_reproduce_the_existing_paths_bit_for_bit(gen, kappa) -> None:
    """Default "local" spread model. Forcing the leave-one-out variance to +inf (kappa =
    1 everywhere: the local share is the whole variance) the new path equals the old
    ``spread_hetero=True`` one (whole deviations times spread_sd); forcing it to 0 (kappa
    = 0) it equals the prior without a factor. Same generator, compared bit for bit."""
    new, ref, z = _limit_case(gen, "local", kappa)
    p = z.shape[1]
    for pr in (new, ref):
        pr.window._chol_cache["loo_var"] = torch.full((p,), math.inf if kappa else 0.0).double()
    s1, m1 = new.posterior(z, 20, gen(7))
    s0, m0 = ref.posterior(z, 20, gen(7))
    assert torch.equal(m1, m0) and torch.equal(s1, s0)


def test_variance_after_scaling_matches_the_closed_form(device, gen) -> None:
    """One step, spread "fixed", rank-1 EOF + Matérn residual, a gap of 8 points plus
    scattered missing points. Per missing point the variance of the returned draws
    must be ``v - v_loo + v_loo s^2`` (shared part kept, local part scaled by ``s^2``)
    with ``v`` the exact posterior variance (:func:`gaussian_conditional`) and
    ``v_loo = 1 / (K^{-1})_pp``. Since kappa is estimated from the same n draws, the
    returned variance is ``v_hat - v_loo + v_loo s^2`` exactly (kappa unclamped), so the
    error is that of a sample variance, sd ``v sqrt(2 / (n - 1))`` = 1.6 % for
    n = 8000; tolerance 5 sd. The whole-deviation factor (``v s^2``) must miss it."""
    pr = _prior(1, 3000.0, spread="fixed")  # neighbour correlation ~0.8: gaps matter
    p = pr.lat.numel()
    s = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    pr.spread_sd, pr.spread_share = s, "local"
    w = pr.window.to(device)
    pr._window = w
    x = torch.randn(p, generator=gen(3), dtype=torch.float64)
    miss = torch.zeros(p, dtype=torch.bool)
    miss[[5, 6, 7, 10, 11, 12, 15, 16, 1, 18]] = True
    x[miss] = float("nan")
    _, cov = gaussian_conditional(torch.zeros(p).double(), w.spatial_cov().cpu(), x)
    v, loo = torch.diagonal(cov)[miss], w.loo_var().cpu()[miss]
    n = 8000
    smp, _ = pr.posterior(x[None].to(device), n, gen(4, device))
    got = smp[:, 0].var(0).cpu()[miss]
    target = v - loo + loo * s[miss] ** 2
    tol = 5 * v * math.sqrt(2 / (n - 1))
    assert bool(((got - target).abs() < tol).all())
    assert bool(((v * s[miss] ** 2 - target).abs() > tol).any())
    assert bool((loo / v < 0.9).any())  # some points have a sizeable shared part


def test_fit_field_prior_spread_hetero_local_keeps_the_mean_and_round_trips(gen) -> None:
    """``spread_hetero="local"``: factors fitted, the flag set and saved, the posterior
    mean identical to the prior without factor; an old checkpoint (no flag) loads with
    the whole-deviation behaviour; a bad value is an InputError."""
    la, lo = _grid(5, 6)
    p = la.numel()
    g = torch.Generator().manual_seed(8)
    x = 2.0 * torch.randn(60, 1, generator=g, dtype=torch.float64)
    x = x + torch.randn(60, p, generator=g, dtype=torch.float64).cumsum(1) / math.sqrt(p)
    grp = torch.zeros(60, dtype=torch.long)
    kw = dict(rank=1, generator=torch.Generator().manual_seed(0))
    loc = fit_field_prior(x, grp, la, lo, 1, spread_hetero="local", **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    old = fit_field_prior(x, grp, la, lo, 1, spread_hetero=True, **kw)
    assert loc.spread_share == "local" and old.spread_share is None and loc.spread_sd is not None
    assert bool((loc.spread_sd >= 0.5 - 1e-12).all() and (loc.spread_sd <= 2 + 1e-12).all())
    z = loc.standardize(x[:3], grp[:3]).clone()
    z[:, ::3] = float("nan")
    _, m1 = loc.posterior(z, 16, gen(1))
    _, m0 = old.posterior(z, 16, gen(1))
    assert torch.equal(m1, m0)
    sd = loc.state_dict()
    assert FieldPrior.from_state_dict(sd).spread_share == "local"
    del sd["spread_share"]  # a checkpoint from before the option
    assert FieldPrior.from_state_dict(sd).spread_share is None
    kw["generator"] = torch.Generator().manual_seed(0)
    res = fit_field_prior(x, grp, la, lo, 1, spread_hetero="resid", **kw)
    assert res.spread_share == "resid" and res.spread_sd is not None
    _, m2 = res.posterior(z, 16, gen(1))
    assert torch.equal(m2, m0)
    with pytest.raises(InputError, match="spread_hetero"):
        fit_field_prior(x, grp, la, lo, 1, spread_hetero="yes")


@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_resid_share_limits_reproduce_the_existing_paths_bit_for_bit(
    gen, monkeypatch, kappa
) -> None:
    """``spread_share="resid"`` with the residual share forced to 1 is the old
    whole-deviation path, forced to 0 the prior without factor (bit for bit)."""
    import assim.impute_holdout as ho

    monkeypatch.setattr(ho, "residual_share", lambda w, z, n, g: torch.full_like(z, kappa))
    new, ref, z = _limit_case(gen, "resid", kappa)
    s1, m1 = new.posterior(z, 20, gen(7))
    s0, m0 = ref.posterior(z, 20, gen(7))
    assert torch.equal(m1, m0) and torch.equal(s1, s0)


def test_residual_share_and_scaled_variance_match_the_closed_form(device, gen) -> None:
    """kappa = v_res / v_post with both exact from :func:`gaussian_conditional` (residual
    covariance alone, full covariance). Each is estimated from n independent draws: the
    log of a sample variance has sd ~sqrt(2 / n), the ratio sqrt(4 / n) = 2.2 % for
    n = 8000; tolerance 5 sd. Then the variance of the "resid" draws must be
    ``(1 - kappa) v + kappa v s^2``: sd of its estimate ~ sqrt(2/n + (kappa (s^2 - 1) /
    f^2)^2 4/n) relative (one sample variance, plus the estimated kappa); 5 sd."""
    p = _grid()[0].numel()
    miss = torch.zeros(p, dtype=torch.bool)
    miss[[5, 6, 7, 10, 11, 12, 15, 16, 1, 18]] = True
    pr = _prior(1, 3000.0, eof=miss + 0.1, spread="fixed")  # a mode centred on the gap
    w = pr.window.to(device)
    x = torch.randn(p, generator=gen(3), dtype=torch.float64)
    x[miss] = float("nan")
    zero = torch.zeros(p).double()
    v = torch.diagonal(gaussian_conditional(zero, w.spatial_cov().cpu(), x)[1])[miss]
    v_res = torch.diagonal(gaussian_conditional(zero, w.resid_cov.cpu(), x)[1])[miss]
    n = 8000
    kappa = residual_share(w, x[None].to(device), n, gen(4, device))[0].cpu()[miss]
    exact = v_res / v
    assert bool((exact < 0.8).any() and (exact > 0.2).all())  # both parts matter here
    assert bool(((kappa / exact).log().abs() < 5 * math.sqrt(4 / n)).all())
    s = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    pr.spread_sd, pr.spread_share, pr._window = s, "resid", w
    smp, _ = pr.posterior(x[None].to(device), n, gen(5, device))
    got = smp[:, 0].var(0).cpu()[miss]
    f2 = (1 - exact) + exact * s[miss] ** 2
    rel = (2 / n + (exact * (s[miss] ** 2 - 1) / f2) ** 2 * 4 / n).sqrt()
    assert bool(((got / (v * f2)).log().abs() < 5 * rel).all())
    assert bool(((s[miss] ** 2 / f2).log().abs() > 5 * rel).any())  # whole factor misses
