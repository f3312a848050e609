"""Observation operators ``h: (N, *S) -> (N, m)`` for :mod:`assim.obs` (re-exported
there; see its docstring for the API). States are flattened in C order wherever a
matrix is involved; ``coords`` are grid positions in index units."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from assim.errors import InputError


def _grid(state_shape: Sequence[int]) -> Tensor:
    """Index coordinates ``(d, len(S))`` of every grid point in C order."""
    axes = [torch.arange(n, dtype=torch.float64) for n in state_shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in mesh], dim=-1)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class Operator:
    """Base class of observation operators ``(N, *S) -> (N, m)``."""

    linear: bool = True
    spec: str = "?"

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise InputError(
                f"observation operator {self.spec}: state must be (N, *S) with particles "
                f"first, got shape {tuple(x.shape)}"
            )
        return self._apply(x)

    def _apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def out_dim(self, state_shape: Sequence[int]) -> int:
        return int(self.coords(state_shape).shape[0])

    def matrix(self, state_shape: Sequence[int], *, dtype=None, device=None) -> Tensor:
        """The matrix ``H`` ``(m, d)`` of a linear operator."""
        raise InputError(f"observation operator {self.spec} is nonlinear: it has no matrix")

    def coords(self, state_shape: Sequence[int]) -> Tensor:
        """Grid coordinates (index units) ``(m, len(S))`` of each observation."""
        raise NotImplementedError

    def jacobian(self, x: Tensor) -> Tensor:
        """``dh/dx`` at each particle, ``(N, m, d)``."""
        H = self.matrix(x.shape[1:], dtype=x.dtype, device=x.device)
        return H.expand(x.shape[0], *H.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class Identity(Operator):
    """``h(x) = x`` flattened: ``m = d``."""

    spec = "identity"

    def _apply(self, x: Tensor) -> Tensor:
        return _flat(x)

    def matrix(self, state_shape, *, dtype=None, device=None) -> Tensor:
        return torch.eye(math.prod(state_shape), dtype=dtype, device=device)

    def coords(self, state_shape) -> Tensor:
        return _grid(state_shape)


class Subset(Operator):
    """Observe selected grid points: explicit flat (C-order) ``indices``, or
    ``every=k`` -- every k-th point along *each* axis starting at 0 (1-D: ``x[::k]``,
    2-D: ``x[::k, ::k]``), or ``stride=k`` -- every k-th point of the flattened state."""

    def __init__(
        self,
        indices: Sequence[int] | Tensor | None = None,
        *,
        every: int | None = None,
        stride: int | None = None,
    ) -> None:
        given = sum(v is not None for v in (indices, every, stride))
        if given != 1:
            raise InputError("Subset: give exactly one of indices, every=, stride=")
        for name, v in (("every", every), ("stride", stride)):
            if v is not None and (int(v) != v or v < 1):
                raise InputError(f"Subset: {name} must be a positive integer, got {v!r}")
        self.every, self.stride = every, stride
        self._indices = None
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
            if idx.numel() == 0:
                raise InputError("Subset: indices is empty")
            self._indices = idx
            self.spec = "subset"
        else:
            self.spec = f"every:{every}" if every is not None else f"stride:{stride}"
        self._cache: dict = {}

    def indices(self, state_shape: Sequence[int], device=None) -> Tensor:
        """Flat C-order indices ``(m,)`` of the observed points."""
        key = (tuple(state_shape), str(device))
        if key not in self._cache:
            d = math.prod(state_shape)
            if self._indices is not None:
                idx = self._indices
                if int(idx.min()) < -d or int(idx.max()) >= d:
                    raise InputError(
                        f"Subset: indices must lie in [0, {d}) for state shape "
                        f"{tuple(state_shape)}, got range [{int(idx.min())}, {int(idx.max())}]"
                    )
                idx = idx % d
            elif self.stride is not None:
                idx = torch.arange(0, d, self.stride)
            else:
                idx = torch.arange(d).reshape(tuple(state_shape))
                idx = idx[tuple(slice(None, None, self.every) for _ in state_shape)].reshape(-1)
            self._cache[key] = idx.to(device)
        return self._cache[key]

    def _apply(self, x: Tensor) -> Tensor:
        return _flat(x)[:, self.indices(x.shape[1:], x.device)]

    def matrix(self, state_shape, *, dtype=None, device=None) -> Tensor:
        idx = self.indices(state_shape)
        H = torch.zeros(idx.numel(), math.prod(state_shape), dtype=dtype, device=device)
        H[torch.arange(idx.numel()), idx.to(H.device)] = 1.0
        return H

    def coords(self, state_shape) -> Tensor:
        return _grid(state_shape)[self.indices(state_shape)]


class Mask(Subset):
    """Observe the grid points where the boolean ``mask`` (shape ``S``) is true."""

    def __init__(self, mask: Tensor) -> None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if not bool(mask.any()):
            raise InputError("Mask: the observation mask selects no grid point")
        super().__init__(mask.reshape(-1).nonzero().reshape(-1))
        self.mask_shape = tuple(mask.shape)
        self.spec = "mask"

    def indices(self, state_shape, device=None) -> Tensor:
        if tuple(state_shape) != self.mask_shape:
            raise InputError(
                f"Mask: mask has shape {self.mask_shape} but the state has shape "
                f"{tuple(state_shape)}"
            )
        return super().indices(state_shape, device)


class Coarsen(Operator):
    """Block mean over ``factor`` points along each axis (1-D or 2-D state); the
    shape must be divisible by ``factor``. ``m = prod(S) / factor**len(S)``."""

    def __init__(self, factor: int) -> None:
        if int(factor) != factor or factor < 1:
            raise InputError(f"Coarsen: factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)
        self.spec = f"coarsen:{self.factor}"

    def _check(self, state_shape) -> tuple[int, ...]:
        f = self.factor
        if len(state_shape) not in (1, 2) or any(n % f for n in state_shape):
            raise InputError(
                f"coarsen:{f} needs a 1-D or 2-D state whose sizes are multiples of {f}, "
                f"got state shape {tuple(state_shape)}"
            )
        return tuple(n // f for n in state_shape)

    def _apply(self, x: Tensor) -> Tensor:
        f, out = self.factor, self._check(x.shape[1:])
        split = [x.shape[0]]
        for n in out:
            split += [n, f]
        y = x.reshape(split).mean(dim=tuple(range(2, 2 + 2 * len(out), 2)))
        return _flat(y)

    def matrix(self, state_shape, *, dtype=None, device=None) -> Tensor:
        d = math.prod(state_shape)
        eye = torch.eye(d, dtype=dtype, device=device).reshape(d, *state_shape)
        return self._apply(eye).T.contiguous()

    def coords(self, state_shape) -> Tensor:
        out = self._check(state_shape)
        return _grid(out) * self.factor + (self.factor - 1) / 2.0


class Linear(Operator):
    """A general matrix ``H`` ``(m, d)`` acting on the flattened state. Its ``coords``
    are the ``|H|``-weighted centroids of each row (non-periodic)."""

    def __init__(self, H: Tensor) -> None:
        H = torch.as_tensor(H)
        if H.dim() != 2:
            raise InputError(f"Linear: H must be a matrix (m, d), got shape {tuple(H.shape)}")
        self.H = H
        self.spec = "linear"
        self._cache: dict = {}

    def _mat(self, d: int, dtype, device) -> Tensor:
        if self.H.shape[1] != d:
            raise InputError(
                f"Linear: H has {self.H.shape[1]} columns but the state has {d} elements"
            )
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = self.H.to(dtype=dtype, device=device)
        return self._cache[key]

    def _apply(self, x: Tensor) -> Tensor:
        xf = _flat(x)
        return xf @ self._mat(xf.shape[1], xf.dtype, xf.device).T

    def matrix(self, state_shape, *, dtype=None, device=None) -> Tensor:
        return self._mat(math.prod(state_shape), dtype or self.H.dtype, device or self.H.device)

    def coords(self, state_shape) -> Tensor:
        w = self.matrix(state_shape, dtype=torch.float64, device="cpu").abs()
        return (w @ _grid(state_shape)) / w.sum(1, keepdim=True).clamp_min(1e-300)


_FUNCS = {
    # name: (f, f')
    "arctan": (torch.atan, lambda w: 1.0 / (1.0 + w * w)),
    "saturating": (lambda w: w / (1.0 + w.abs()), lambda w: 1.0 / (1.0 + w.abs()) ** 2),
    "cubic": (lambda w: w**3, lambda w: 3.0 * w * w),
}


class Pointwise(Operator):
    """Elementwise nonlinearity ``f`` applied after a linear selection ``base``:
    ``h(x) = f(H x)`` with ``f`` in ``arctan``, ``saturating`` (``w / (1 + |w|)``),
    ``cubic`` (``w**3``). Several names compose left to right."""

    linear = False

    def __init__(self, func: str | Sequence[str], base: Operator | None = None) -> None:
        funcs = [func] if isinstance(func, str) else list(func)
        for f in funcs:
            if f not in _FUNCS:
                raise InputError(
                    f"unknown pointwise function {f!r}; expected one of {list(_FUNCS)}"
                )
        base = base if base is not None else Identity()
        if not base.linear:
            raise InputError("Pointwise: base must be a linear operator")
        self.funcs, self.base = funcs, base
        self.spec = ",".join(funcs + ([] if isinstance(base, Identity) else [base.spec]))

    def _apply(self, x: Tensor) -> Tensor:
        w = self.base(x)
        for f in self.funcs:
            w = _FUNCS[f][0](w)
        return w

    def coords(self, state_shape) -> Tensor:
        return self.base.coords(state_shape)

    def jacobian(self, x: Tensor) -> Tensor:
        w, g = self.base(x), None
        for f in self.funcs:
            d = _FUNCS[f][1](w)
            g = d if g is None else g * d
            w = _FUNCS[f][0](w)
        H = self.base.matrix(x.shape[1:], dtype=x.dtype, device=x.device)
        return g.unsqueeze(-1) * H


def Arctan(base: Operator | None = None) -> Pointwise:  # noqa: N802 - constructor alias
    return Pointwise("arctan", base)


def Saturating(base: Operator | None = None) -> Pointwise:  # noqa: N802
    return Pointwise("saturating", base)


def Cubic(base: Operator | None = None) -> Pointwise:  # noqa: N802
    return Pointwise("cubic", base)


class _Rows(Operator):
    """The rows ``rows`` of another operator (used by :meth:`Observation.subset`)."""

    def __init__(self, base: Operator, rows: Tensor) -> None:
        self.base, self.rows, self.linear = base, rows, base.linear
        self.spec = f"{base.spec}[{rows.numel()} rows]"

    def _apply(self, x: Tensor) -> Tensor:
        return self.base(x)[:, self.rows.to(x.device)]

    def matrix(self, state_shape, *, dtype=None, device=None) -> Tensor:
        H = self.base.matrix(state_shape, dtype=dtype, device=device)
        return H[self.rows.to(H.device)]

    def coords(self, state_shape) -> Tensor:
        return self.base.coords(state_shape)[self.rows]

    def jacobian(self, x: Tensor) -> Tensor:
        return self.base.jacobian(x)[:, self.rows.to(x.device)]


def parse_operator(spec: str) -> Operator:
    """Build an operator from a comma-separated spec: at most one linear selection
    (``identity``, ``every:k``, ``stride:k``, ``coarsen:f``) and any pointwise
    functions (``arctan``, ``saturating``, ``cubic``), applied after the selection."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"--operator: empty operator spec {spec!r}")
    funcs: list[str] = []
    base: Operator | None = None
    for term in (t.strip().lower() for t in spec.split(",")):
        name, _, arg = term.partition(":")
        if name in _FUNCS and not arg:
            funcs.append(name)
            continue
        if base is not None:
            raise InputError(f"--operator {spec!r}: more than one selection ({term!r})")
        if name == "identity" and not arg:
            base = Identity()
            continue
        try:
            k = int(arg)
        except ValueError:
            k = None
        if name == "every" and k is not None and k >= 1:
            base = Subset(every=k)
        elif name == "stride" and k is not None and k >= 1:
            base = Subset(stride=k)
        elif name == "coarsen" and k is not None and k >= 1:
            base = Coarsen(k)
        else:
            raise InputError(
                f"--operator {spec!r}: cannot parse {term!r}; expected identity, every:K, "
                f"stride:K, coarsen:F, arctan, saturating or cubic (comma-separated)"
            )
    base = base or Identity()
    return Pointwise(funcs, base) if funcs else base
