"""Observation operators, noise models and the likelihood ``p(y | x)`` (DESIGN.md §2).

Shapes: states ``x`` are ``(N, *S)`` (particles first), ``d = prod(S)`` and the state
is flattened in C order wherever a matrix is involved. An observation vector ``y`` is
``(m,)``; ``NaN`` entries of ``y`` are *unobserved* and are dropped (the exact
marginal likelihood of the observed entries, also for a full ``R``).

API (filters code against exactly this):

Operators -- callable ``op(x: (N, *S)) -> (N, m)`` with
    ``linear: bool``; ``matrix(state_shape) -> (m, d)`` (linear ones, else raises);
    ``jacobian(x) -> (N, m, d)``; ``coords(state_shape) -> (m, len(S))`` grid
    coordinates in index units of each observation, for localisation (coarsen: the
    block centre); ``out_dim(state_shape) -> m``; ``spec`` (the string that
    :func:`parse_operator` turns back into the operator).
    Kinds: :class:`Identity`, :class:`Subset` (flat indices, or ``every=k``: every
    k-th point along each axis), :class:`Mask`, :class:`Coarsen` (block mean, 1-D and
    2-D), :class:`Linear` (a matrix ``H``), :class:`Pointwise` (``arctan``,
    ``saturating`` ``w/(1+|w|)``, ``cubic``) applied after a linear ``base``;
    :func:`Arctan`, :func:`Saturating`, :func:`Cubic` are shorthands.
Noise -- :class:`GaussianNoise` (``std`` or ``var``: scalar or ``(m,)``; or full
    ``R`` ``(m, m)``) and :class:`StudentTNoise` (independent Student-t, ``scale``
    scalar or ``(m,)``, ``df``); ``covariance(m) -> (m, m)``;
    ``log_prob(residual (N, m)) -> (N,)``; ``sample(shape, generator)``;
    ``marginal(index)``. A non-positive-definite ``R`` raises :class:`InputError`.
:class:`Observation` ``(operator, noise)`` -- ``h(x)``; ``log_likelihood(y, x) ->
    (N,)``; ``sample(x, generator) -> y``; ``observed(y) -> bool mask``;
    ``subset(mask) -> Observation`` restricted to those entries (operator rows and
    noise marginal), so that Kalman-type filters handle NaN by subsetting.
:func:`parse_operator` -- ``"identity"``, ``"every:4"``, ``"stride:4"`` (every 4th
    flattened point), ``"coarsen:8"``, ``"arctan"``, ``"arctan,every:2"``, ...
:func:`make_observation` -- ``(operator spec, sigma, noise="gaussian", df)``: what an
    observation file's attributes record.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from assim.errors import InputError
from assim.obs_noise import GaussianNoise, Noise, StudentTNoise
from assim.obs_ops import (  # noqa: F401  (used by obs_space, dpf_local)
    _FUNCS,
    Arctan,
    Coarsen,
    Cubic,
    Identity,
    Linear,
    Mask,
    Operator,
    Pointwise,
    Saturating,
    Subset,
    _flat,
    _grid,
    _Rows,
    parse_operator,
)

__all__ = [
    "Arctan",
    "Coarsen",
    "Cubic",
    "GaussianNoise",
    "Identity",
    "Linear",
    "Mask",
    "Observation",
    "Operator",
    "Pointwise",
    "Saturating",
    "StudentTNoise",
    "Subset",
    "make_observation",
    "parse_operator",
]


class Observation:
    """``y = h(x) + eps``, ``eps ~ noise``. See the module docstring for the API."""

    def __init__(self, operator: Operator | str, noise: Noise) -> None:
        self.operator = parse_operator(operator) if isinstance(operator, str) else operator
        self.noise = noise

    @property
    def linear(self) -> bool:
        return self.operator.linear

    def h(self, x: Tensor) -> Tensor:
        """``h(x)`` ``(N, *S) -> (N, m)``."""
        return self.operator(x)

    def dim(self, state_shape: Sequence[int]) -> int:
        return self.operator.out_dim(state_shape)

    def observed(self, y: Tensor) -> Tensor:
        """Boolean mask ``(m,)`` of the entries of ``y`` that were observed (not NaN)."""
        return ~torch.isnan(y)

    def subset(self, mask: Tensor) -> Observation:
        """The observation restricted to the entries where ``mask`` ``(m,)`` is true."""
        rows = torch.as_tensor(mask).reshape(-1).nonzero().reshape(-1).cpu()
        return Observation(_Rows(self.operator, rows), self.noise.marginal(rows))

    def _check_y(self, y: Tensor, m: int) -> None:
        if y.dim() != 1 or y.shape[0] != m:
            raise InputError(
                f"observation y has shape {tuple(y.shape)}, but operator "
                f"{self.operator.spec} gives ({m},) for this state"
            )

    def log_likelihood(self, y: Tensor, x: Tensor) -> Tensor:
        """``log p(y | x_i)`` ``(N,)`` for ``y`` ``(m,)`` and ``x`` ``(N, *S)``; NaN
        entries of ``y`` are marginalised out (for a full ``R``: the observed block)."""
        hx = self.h(x)
        y = torch.as_tensor(y, dtype=hx.dtype, device=hx.device)
        self._check_y(y, hx.shape[1])
        obs = self.observed(y)
        if bool(obs.all()):
            return self.noise.log_prob(y - hx)
        if not bool(obs.any()):
            return hx.new_zeros(hx.shape[0])
        rows = obs.nonzero().reshape(-1)
        noise = self.noise.marginal(rows.cpu())
        return noise.log_prob(y[rows] - hx[:, rows])

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y_i = h(x_i) + eps_i`` for each state of ``x`` ``(N, *S)``: ``(N, m)``."""
        hx = self.h(x)
        return hx + self.noise.sample(hx.shape, generator, device=hx.device, dtype=hx.dtype)

    def __repr__(self) -> str:
        return f"Observation({self.operator!r}, {self.noise!r})"


def make_observation(
    operator: str, sigma: float, noise: str = "gaussian", df: float | None = None
) -> Observation:
    """The observation an observation file describes: operator spec, noise std
    ``sigma`` (Gaussian) or scale (Student-t with ``df`` degrees of freedom)."""
    if noise == "gaussian":
        return Observation(parse_operator(operator), GaussianNoise(std=sigma))
    if noise in ("student-t", "studentt", "t"):
        if df is None:
            raise InputError("Student-t observation noise needs df (degrees of freedom)")
        return Observation(parse_operator(operator), StudentTNoise(sigma, df))
    raise InputError(f"unknown observation noise {noise!r}; expected 'gaussian' or 'student-t'")
