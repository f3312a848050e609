"""The diffusion particle filter: one SMC over (physical step k, diffusion step j).

A diffusion world generates ``x_{k+1}`` from ``x_k`` through a chain ``x_{t_J} -> ... ->
x_{t_0} = x_{k+1}`` (:class:`~models.worlds.base.TransitionChain`). The filter runs a
single sequential Monte Carlo over the path (as SURGE, twisted diffusion sampling --
Wu et al. 2023 -- and Feynman–Kac steering -- Singhal et al. 2025 -- do inside one
diffusion sample). At inner index ``j`` the target is

    pi_{k,j}(x_k, x_{t_J:t_j}) ∝ p(x_k | y_{1:k}) p(x_{t_J:t_j} | x_k) p~_j(y_{k+1} | x_{t_j}),

with the twist ``p~_j`` of :mod:`assim.guidance` (``p~_0 = g`` the exact likelihood at
the last index), so the final weighted particles target ``p(x_{k+1} | y_{1:k+1})``.
Every step proposes from the world's kernel combined with the twist and is weighted by
``p(x_s | x_t) p~_s(y | x_s) / (q(x_s | x_t, y) p~_t(y | x_t))``; the product over the
chain telescopes, so the estimate is consistent as ``N -> inf`` whatever the twist
(Del Moral 2004; Chopin & Papaspiliopoulos 2020, ch. 10). Resampling is adaptive
(``ESS < threshold N``) both between physical steps and inside the chain; the
evidence ``p(y_{k+1} | y_{1:k})`` is estimated without bias in ``exp`` by the product of
the weighted means of the incremental weights (:func:`assim.smc.reweight`).

Twists (``twist=``): ``"gaussian"`` (closed-form twisted proposal -- the best in the
study), ``"dps"`` (gradient shift, exact weights), ``"none"`` (bootstrap filter through
the chain), ``"dps_only"`` (DPS without weights: **biased**, ``log_z`` NaN, for
comparison). The world's model-error level ``q`` (e.g.
:meth:`Conditional.configure(q=...)`) enters through the chain's ``denoise_var``.
The localised variant is :class:`~assim.filters.dpf_local.LocalDiffusionParticleFilter`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from assim.errors import InputError
from assim.filters.base import Ensemble, Filter
from assim.guidance import TWISTS, Guide, Increment, ObsSpace
from assim.smc import WeightCollapse, ess, get_resampler, maybe_resample, normalize, reweight

__all__ = ["DiffusionParticleFilter", "innovation_q2", "make_dpf"]


class DiffusionParticleFilter(Filter):
    """Global diffusion particle filter (the consistent method).

    Args:
        twist: ``"gaussian"``, ``"dps"``, ``"none"`` or ``"dps_only"`` (module doc).
        ess_threshold: resample between physical steps when ``ESS < ess_threshold N``.
        inner_threshold: the same inside the diffusion chain.
        scheme: resampling scheme of :mod:`assim.smc` (``systematic`` ...).
        dps_scale: step size ``zeta`` of the DPS shift.
        adapt_q: ``rho`` in ``[0, 1]``; ``> 0`` adapts the world's model-error level ``q``
            (worlds with ``configure(q=...)``, Gaussian twist) from the innovations:
            :func:`innovation_q2` at every analysis, smoothed as ``q^2 <- (1 - rho) q^2 +
            rho q_hat^2`` and clamped to ``q_range``. The ``q`` of cycle ``k + 1`` depends on
            ``y_{1:k}`` only, so every cycle is an exact SMC step for the model with that
            cycle's ``q`` (the weights stay consistent for this data-adapted model-error
            schedule, as for adaptive inflation in ensemble Kalman filters).
        q_range: ``(q_min, q_max)`` of the adapted ``q``.
        moves: number of exact pCN Metropolis–Hastings moves of ``x_{k+1}`` after the last
            diffusion step (:func:`~assim.filters.dpf_moves.pcn_moves`; target: the final
            kernel times the likelihood, so the weights stay exact); ``0`` (default): none.
        move_beta: pCN step size in ``(0, 1]``.
    ``info`` per cycle: ``ess`` (outer ESS after the last weighting, before resampling),
    ``min_inner_ess``, ``log_z`` (evidence increment), ``resampled`` (outer),
    ``inner_resamples`` (count), ``collapsed``, ``biased`` (``dps_only``), ``skipped``,
    ``q`` (the world's model-error level in this cycle, when it has one), ``move_accept``
    (mean acceptance rate of the moves).
    """

    name = "dpf"
    local = False

    def __init__(
        self,
        twist: str = "gaussian",
        ess_threshold: float = 0.5,
        inner_threshold: float = 0.5,
        scheme: str = "systematic",
        dps_scale: float = 1.0,
        adapt_q: float = 0.0,
        q_range: tuple[float, float] = (0.05, 2.0),
        moves: int = 0,
        move_beta: float = 0.5,
    ) -> None:
        if twist not in TWISTS:
            raise InputError(f"--twist: unknown twist {twist!r}; expected one of {list(TWISTS)}")
        if not 0.0 <= float(adapt_q) <= 1.0:
            raise InputError(f"adapt_q must lie in [0, 1], got {adapt_q!r}")
        if adapt_q > 0 and twist != "gaussian":
            raise InputError("adapt_q needs twist='gaussian' (it uses the twist's denoised state)")
        lo, hi = (float(v) for v in q_range)
        if not 0.0 < lo <= hi < math.inf:
            raise InputError(f"q_range must be 0 < q_min <= q_max < inf, got {q_range!r}")
        self.adapt_q, self.q_range = float(adapt_q), (lo, hi)
        self._q2: float | None = None  # adapted q^2 (None: not yet estimated)
        self._r_scale = 1.0  # R of the observation passed in / the true R (hybrid: 1 - gamma)
        if int(moves) != moves or moves < 0:
            raise InputError(f"moves must be an integer >= 0, got {moves!r}")
        if not 0.0 < float(move_beta) <= 1.0:
            raise InputError(f"move_beta must lie in (0, 1], got {move_beta!r}")
        self.moves, self.move_beta = int(moves), float(move_beta)
        self._final: tuple | None = None  # (final kernel, space, y) of the last cycle
        for name, v in (("ess_threshold", ess_threshold), ("inner_threshold", inner_threshold)):
            if not (v >= 0 and math.isfinite(v)):
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        get_resampler(scheme)
        self.twist, self.scheme = twist, scheme
        self.ess_threshold, self.inner_threshold = float(ess_threshold), float(inner_threshold)
        self.dps_scale = float(dps_scale)
        self._spaces: OrderedDict = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(twist={self.twist!r}, ess_threshold={self.ess_threshold}, "
            f"inner_threshold={self.inner_threshold}, scheme={self.scheme!r})"
        )

    def analysis(
        self,
        ensemble: Ensemble,
        y: Tensor,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Not available: the proposal is the guided world step, so use :meth:`cycle`."""
        raise NotImplementedError(
            "the diffusion particle filter fuses forecast and analysis: call cycle()"
        )

    # ------------------------------------------------------------------ helpers
    def _space(self, obs: Any, y: Tensor, x: Tensor) -> tuple[ObsSpace | None, Tensor | None]:
        """The observation space of the observed entries of ``y`` (cached)."""
        y = torch.as_tensor(y).to(device=x.device, dtype=x.dtype).reshape(-1)
        seen = ~torch.isnan(y)
        if not bool(seen.any()):
            return None, None
        full = bool(seen.all())
        # the cache holds ``obs`` itself, so its ``id`` cannot be reused while cached
        key = (id(obs), None if full else tuple(seen.tolist()), x.shape[1:], x.dtype, x.device)
        if key not in self._spaces:
            sub = obs if full else obs.subset(seen)
            space = self._make_space(sub, tuple(x.shape[1:]), x.dtype, x.device)
            self._spaces[key] = (obs, space)
            while len(self._spaces) > 8:
                self._spaces.popitem(last=False)
        return self._spaces[key][1], y[seen]

    def _make_space(self, obs: Any, state_shape, dtype, device) -> Any:
        sp = ObsSpace(obs, state_shape, dtype, device)
        if obs.h(torch.zeros(1, *state_shape, dtype=dtype, device=device)).shape[1] != sp.m:
            raise InputError(f"observation operator {obs.operator!r} does not fit the state")
        return sp

    # Weight bookkeeping (overridden by the localised filter) --------------------------
    def _weights(self, log_w: Tensor, n: int, space: Any) -> dict[str, Any]:
        return {"log_w": log_w}

    def _add(self, w: dict[str, Any], inc: Increment, n: int, like: Tensor) -> float:
        """Multiply the weights by ``inc``; returns the evidence increment."""
        w["log_w"], dz = reweight(w["log_w"], inc.total(n, like))
        return float(dz)

    def _ess(self, w: dict[str, Any]) -> float:
        return float(ess(w["log_w"]))

    def _resample(self, w: dict[str, Any], n: int, generator) -> Tensor:
        idx = get_resampler(self.scheme)(w["log_w"], n, generator)
        w["log_w"] = torch.full_like(w["log_w"], -math.log(n))
        return idx

    def _gather(self, t: Tensor, idx: Tensor) -> Tensor:
        return t[idx.to(t.device)]

    def _after_resample(self, guide: Guide, chain: Any, x: Tensor, idx: Tensor, j: int) -> None:
        guide.reindex(chain, idx)

    def _final_log_w(self, w: dict[str, Any]) -> Tensor:
        return w["log_w"]

    # ------------------------------------------------------------------ the filter
    def propagate(
        self,
        world: Any,
        ensemble: Ensemble,
        y: Tensor | None,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """One physical step of the path SMC, ending *before* any end-of-cycle resampling.

        Returns the particles ``x_{k+1}`` ``(N, *S)``, their normalised log-weights
        (``(N,)``; local filter: ``(N, d)`` per grid point) and ``info``. Runs under
        :func:`torch.inference_mode` (no autograd bookkeeping: a few per cent faster on
        CPU) except for the DPS twists, which need gradients (``no_grad`` then, re-enabled
        inside :func:`~assim.guidance.twist_gradient`); the returned tensors are ordinary
        tensors either way.
        """
        dps = self.twist in ("dps", "dps_only")
        with torch.no_grad() if dps else torch.inference_mode():
            x, log_w, info = self._propagate(world, ensemble, y, obs, generator)
        return _plain(x), _plain(log_w), info

    def _propagate(
        self,
        world: Any,
        ensemble: Ensemble,
        y: Tensor | None,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        if not hasattr(world, "transition_sampler"):
            raise InputError(
                f"the diffusion particle filter needs a diffusion world (with "
                f"transition_sampler), got {type(world).__name__}"
            )
        n = ensemble.size
        self._final = None
        log_w = normalize(ensemble.log_w)[0]
        ens, log_w, res_outer = maybe_resample(
            ensemble, log_w, self.ess_threshold, self.scheme, generator
        )
        x_k = ens.x
        if self.adapt_q > 0 and self._q2 is not None:
            if not hasattr(world, "configure"):
                raise InputError("adapt_q needs a world with configure(q=...)")
            world.configure(q=math.sqrt(self._q2))
        info: dict[str, Any] = {
            "q": getattr(world, "q", None),
            "resampled": res_outer,
            "inflation": 1.0,
            "inner_resamples": 0,
            "collapsed": False,
            "biased": self.twist == "dps_only",
        }
        if y is None or bool(torch.isnan(torch.as_tensor(y)).all()):
            x = world.step(x_k, generator=generator)
            info.update(ess=float(ess(log_w)), min_inner_ess=math.nan, log_z=0.0, skipped=True)
            w = self._weights(log_w, n, None)
            return x, self._final_log_w(w), info
        chain = world.transition_sampler(x_k)
        x = chain.init(generator)
        space, y_obs = self._space(obs, y, x)  # in the chain's dtype (a world may cast)
        guide = Guide(chain, space, y_obs, self.twist, self.dps_scale, per_obs=self.local)
        w = self._weights(log_w.to(x.dtype), n, space)
        log_z, min_inner, j_next = 0.0, math.inf, 0
        try:
            start = guide.start(x)
            if self.adapt_q > 0 and space is not None:
                self._adapt(world, space, y_obs, guide._x_hat, log_w.to(x.dtype))
            log_z += self._add(w, start, n, x)
            for j in range(len(chain.times) - 1):
                e = self._ess(w)
                min_inner = min(min_inner, e)
                if self.inner_threshold >= 1 or e < self.inner_threshold * n:
                    idx = self._resample(w, n, generator)
                    x, x_k = self._gather(x, idx), self._gather(x_k, idx)
                    if hasattr(chain, "reindex"):  # hidden state (Rolling): (N,) or (D, N)
                        chain.reindex(idx)
                    else:
                        chain = world.transition_sampler(x_k)
                    self._after_resample(guide, chain, x, idx, j)
                    info["inner_resamples"] += 1
                x, inc = guide.step(x, j, generator)
                j_next = j + 1
                log_z += self._add(w, inc, n, x)
        except WeightCollapse:
            # every weight is zero: finish the chain unguided with equal weights, report it
            for j in range(j_next, len(chain.times) - 1):
                x = chain.kernel(x, j).sample(generator)
            flat = torch.full((n,), -math.log(n), dtype=x.dtype, device=x.device)
            w = self._weights(flat, n, space)
            info["collapsed"], log_z = True, -math.inf
        if self.moves and not info["collapsed"] and guide.final_kernel is not None:
            self._final = (guide.final_kernel, space, y_obs)
            if not self.local:  # the localised filter moves after its local resampling
                x = self._move(x, generator, info)
        info.update(
            ess=self._ess(w),
            min_inner_ess=min_inner,
            log_z=math.nan if self.twist == "dps_only" else log_z,
            skipped=False,
        )
        return x, self._final_log_w(w), info

    def _move(self, x: Tensor, generator: torch.Generator | None, info: dict) -> Tensor:
        """Apply the exact pCN moves to ``x`` with the last cycle's final kernel."""
        from assim.filters.dpf_moves import pcn_moves

        kern, space, y = self._final
        x, info["move_accept"] = pcn_moves(x, kern, space, y, self.moves, self.move_beta, generator)
        return x

    def _adapt(self, world: Any, space: ObsSpace, y: Tensor, x_hat: Tensor, log_w: Tensor) -> None:
        """Update the smoothed ``q^2`` for the *next* cycle (see ``adapt_q``)."""
        q2 = innovation_q2(space, y, x_hat, log_w, self._r_scale)
        prev = float(getattr(world, "q", 0.0)) ** 2 if self._q2 is None else self._q2
        new = (1.0 - self.adapt_q) * prev + self.adapt_q * q2
        lo, hi = self.q_range
        self._q2 = min(max(new, lo * lo), hi * hi)

    def cycle(
        self,
        world: Any,
        ensemble: Ensemble,
        y: Tensor | None,
        obs: Any,
        generator: torch.Generator | None = None,
    ) -> tuple[Ensemble, dict[str, Any]]:
        """Forecast through the guided chain and weight by ``y`` (see :meth:`propagate`);
        the weighted ensemble is returned (resampling happens at the next cycle)."""
        x, log_w, info = self.propagate(world, ensemble, y, obs, generator)
        return Ensemble(x, log_w), info


def innovation_q2(
    space: ObsSpace, y: Tensor, x_hat: Tensor, log_w: Tensor, r_scale: float = 1.0
) -> float:
    """Model-error variance that explains the innovations of one analysis.

    ``x_hat`` ``(N, *S)``: each particle's denoised forecast ``D_0(x_{t_J})`` ~ ``E[x_{k+1}
    | x_k]``; ``log_w`` ``(N,)`` normalised prior weights. With ``y = h(x_{k+1}) + eps``
    and ``x_{k+1} = E[x_{k+1} | x_k] + N(0, q^2 I)``, linearised, ``E[d_o^2] = R_oo + s_o^2
    + q^2 a_o^2 sum_i H_oi^2`` for the innovation ``d = y - sum_n W_n h(x_hat_n)`` and the
    weighted spread ``s^2`` of ``h(x_hat)``; the moment estimate (as adaptive inflation,
    Desroziers et al. 2005, QJRMS 131; Miyoshi 2011, MWR 139) is
    ``q_hat^2 = sum_o (d_o^2 - R_oo - s_o^2) / sum_o a_o^2 sum_i H_oi^2`` (may be < 0).
    ``r_scale`` multiplies the space's ``R`` (the hybrid filter's tempered observation
    has ``R / (1 - gamma)``; ``r_scale = 1 - gamma`` gives back the true ``R``)."""
    hx, a = space.h_and_slope(x_hat)
    w = log_w.exp().unsqueeze(1)
    mean = (w * hx).sum(0)
    spread = (w * (hx - mean) ** 2).sum(0)
    r = r_scale * (space.r_var if space.r_var is not None else torch.diagonal(space.R))
    gain = space.H2.sum(1) * (1.0 if a is None else (w * a * a).sum(0))
    return float(((y - mean) ** 2 - r - spread).sum() / gain.sum().clamp_min(1e-30))


def _plain(t: Tensor) -> Tensor:
    """An ordinary tensor (a copy of an inference-mode tensor, so callers may modify it)."""
    return t.clone() if t.is_inference() else t


def make_dpf(world: Any = None, **options: Any) -> Filter:
    """Build a diffusion particle filter from CLI/config options.

    ``radius`` (finite) selects the localised filter (``periodic``, ``cutoff``);
    ``steps`` / ``q`` reconfigure the world's chain when it has ``configure`` (the
    learned :class:`~models.worlds.conditional.Conditional` world); the other options go
    to :class:`DiffusionParticleFilter` (``twist``, ``ess_threshold`` -- alias
    ``threshold`` --, ``inner_threshold``, ``scheme`` -- alias ``resample`` --,
    ``dps_scale``, ``adapt_q``, ``q_range``, ``moves``, ``move_beta``); ``hybrid``,
    ``hybrid_radius`` and ``spread_factor`` exist for the localised filter only. ``None``
    values are ignored; unknown options raise :class:`InputError`.
    """
    opts = {k: v for k, v in options.items() if v is not None}
    for alias, name in (("threshold", "ess_threshold"), ("resample", "scheme")):
        if alias in opts:
            opts[name] = opts.pop(alias)
    allowed = {"twist", "ess_threshold", "inner_threshold", "scheme", "dps_scale", "radius",
               "periodic", "cutoff", "reuse_denoised", "steps", "q", "adapt_q",
               "q_range", "moves", "move_beta", "hybrid", "hybrid_radius",
               "spread_factor"}  # fmt: skip
    bad = sorted(set(opts) - allowed)
    if bad:
        raise InputError(f"method dpf does not take option(s) {bad}; allowed {sorted(allowed)}")
    chain_opts = {k: opts.pop(k) for k in ("steps", "q") if k in opts}
    if chain_opts:
        if world is None or not hasattr(world, "configure"):
            raise InputError(
                f"options {sorted(chain_opts)} need a world with configure() (a learned "
                "diffusion world)"
            )
        world.configure(**chain_opts)
    radius = opts.pop("radius", None)
    if radius is not None and math.isfinite(float(radius)):
        from assim.filters.dpf_local import LocalDiffusionParticleFilter

        return LocalDiffusionParticleFilter(radius=float(radius), **opts)
    if opts.get("hybrid") or opts.get("spread_factor", 1.0) != 1.0:
        raise InputError(
            "hybrid (ensemble-Kalman/particle split) and spread_factor need the localised "
            "dpf (a finite radius): they are approximations, the global dpf stays exact"
        )
    for name in (
        "periodic",
        "cutoff",
        "reuse_denoised",
        "hybrid",
        "hybrid_radius",
        "spread_factor",
    ):
        opts.pop(name, None)
    return DiffusionParticleFilter(**opts)
