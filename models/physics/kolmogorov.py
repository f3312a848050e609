"""2-D Kolmogorov flow: pseudo-spectral vorticity on the periodic square [0, 2π)².

Vorticity form of the forced, damped incompressible Navier–Stokes equations,

    ∂ω/∂t + u·∇ω = ν ∇²ω − α ω + curl F,     ν = 1/Re,
    ∇²ψ = −ω,   u = ∂ψ/∂y,   v = −∂ψ/∂x,     F = (A sin(k_f y), 0),

so ``curl F = ∂F_y/∂x − ∂F_x/∂y = −A k_f cos(k_f y)`` (the vorticity forcing of
jax-cfd's spectral ``kolmogorov_forcing_fn``, ``−4 cos(4y)``). The defaults (Re =
1000, k_f = 4, A = 1, linear drag α = 0.1) are the Kolmogorov setup of jax-cfd used
by score-based data assimilation (SDA, Rozet & Louppe 2023). SDA simulates on 256²
and coarsens to 64²; here the equations are solved directly on the 64² grid, which
under-resolves the smallest scales at Re = 1000 (the dealiased spectrum still decays
by ~1.5 decades to the cutoff and runs stay bounded).

Discretisation: Fourier pseudo-spectral in space (``torch.fft.rfft2``), the
nonlinear term evaluated in physical space from fields truncated by the 2/3 rule
(Orszag 1971), so the Galerkin-truncated advection conserves energy and enstrophy.
Time: integrating-factor RK4 (Lawson 1967) — the linear part ``L = −ν|k|² − α``
is integrated exactly, the advection and forcing with classical RK4 (jax-cfd uses
a Crank–Nicolson/RK4 implicit–explicit scheme for the same split). The exact
linear propagator makes the unforced Taylor–Green vortex decay as ``e^{−(2ν+α)t}``
to round-off; the advective CFL limits ``dt`` (see :meth:`Kolmogorov.cfl_dt`).

Shapes: a batch of vorticity fields is ``(N, n, n)`` indexed ``[member, y, x]``,
``x_j = y_j = 2π j / n``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.physics.base import Simulator, randn_on


class Kolmogorov(Simulator):
    """Forced 2-D turbulence on an ``n × n`` periodic grid (state ``(N, n, n)``)."""

    default_dt = 0.01  # advective CFL ≈ 0.5 for |u| ≈ 5 at n = 64

    def __init__(
        self,
        n: int = 64,
        re: float = 1000.0,
        k_f: int = 4,
        drag: float = 0.1,
        amplitude: float = 1.0,
    ):
        if n < 8 or n % 2:
            raise ValueError(f"Kolmogorov: n must be even and >= 8, got {n}")
        self.n, self.re, self.k_f = int(n), float(re), int(k_f)
        self.drag, self.amplitude = float(drag), float(amplitude)
        self.nu = 1.0 / self.re
        self.state_shape = (self.n, self.n)
        self._cache: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ grid
    def grid(
        self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Coordinates ``(y, x)`` of shape ``(n, n)`` each (``indexing="ij"``)."""
        c = torch.arange(self.n, dtype=dtype, device=device) * (2 * math.pi / self.n)
        y, x = torch.meshgrid(c, c, indexing="ij")
        return y, x

    def _ops(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            n, dt, dev = self.n, like.dtype, like.device
            ky = torch.fft.fftfreq(n, 1.0 / n, dtype=dt, device=dev)[:, None]
            kx = torch.fft.rfftfreq(n, 1.0 / n, dtype=dt, device=dev)[None, :]
            k2 = kx**2 + ky**2
            inv_k2 = torch.where(k2 > 0, 1.0 / k2.clamp_min(1.0), torch.zeros_like(k2))
            kmax = n // 3  # 2/3 rule: keep |k_x|, |k_y| < n/3
            dealias = ((kx.abs() < kmax) & (ky.abs() < kmax)).to(dt)
            y, _ = self.grid(dt, dev)
            force = -self.amplitude * self.k_f * torch.cos(self.k_f * y)
            lin = -self.nu * k2 - self.drag
            lin = torch.where(k2 > 0, lin, torch.zeros_like(lin))  # mean vorticity stays 0
            self._cache[key] = {
                "ikx": 1j * kx,
                "iky": 1j * ky,
                "inv_k2": inv_k2,
                "dealias": dealias,
                "lin": lin,
                "force_hat": torch.fft.rfft2(force) * dealias,
            }
        return self._cache[key]

    # -------------------------------------------------------------- operators
    def _velocity_hat(self, w_hat: Tensor, ops: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        psi_hat = w_hat * ops["inv_k2"]
        return ops["iky"] * psi_hat, -ops["ikx"] * psi_hat

    def velocity(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Velocity ``(u, v)``, each ``(N, n, n)``, from vorticity ``(N, n, n)``
        via the streamfunction ``ψ = −∇⁻²ω``: ``u = ∂ψ/∂y``, ``v = −∂ψ/∂x``."""
        ops = self._ops(w)
        u_hat, v_hat = self._velocity_hat(torch.fft.rfft2(w), ops)
        s = (self.n, self.n)
        return torch.fft.irfft2(u_hat, s=s), torch.fft.irfft2(v_hat, s=s)

    def divergence(self, u: Tensor, v: Tensor) -> Tensor:
        """Spectral ``∂u/∂x + ∂v/∂y`` of a velocity field ``(N, n, n)``."""
        ops = self._ops(u)
        d = ops["ikx"] * torch.fft.rfft2(u) + ops["iky"] * torch.fft.rfft2(v)
        return torch.fft.irfft2(d, s=(self.n, self.n))

    def curl(self, u: Tensor, v: Tensor) -> Tensor:
        """Spectral vorticity ``∂v/∂x − ∂u/∂y`` of a velocity field ``(N, n, n)``."""
        ops = self._ops(u)
        c = ops["ikx"] * torch.fft.rfft2(v) - ops["iky"] * torch.fft.rfft2(u)
        return torch.fft.irfft2(c, s=(self.n, self.n))

    def _nonlinear_hat(self, w_hat: Tensor, ops: dict[str, Tensor]) -> Tensor:
        """Dealiased ``−(u·∇ω)^`` plus the forcing, from dealiased ``ω̂``."""
        s = (self.n, self.n)
        w_hat = w_hat * ops["dealias"]
        u_hat, v_hat = self._velocity_hat(w_hat, ops)
        u, v = torch.fft.irfft2(u_hat, s=s), torch.fft.irfft2(v_hat, s=s)
        wx = torch.fft.irfft2(ops["ikx"] * w_hat, s=s)
        wy = torch.fft.irfft2(ops["iky"] * w_hat, s=s)
        adv_hat = torch.fft.rfft2(u * wx + v * wy) * ops["dealias"]
        return -adv_hat + ops["force_hat"]

    def advection(self, w: Tensor) -> Tensor:
        """Dealiased advection term ``u·∇ω`` in physical space, ``(N, n, n)``."""
        ops = self._ops(w)
        w_hat = torch.fft.rfft2(w)
        nl = self._nonlinear_hat(w_hat, ops) - ops["force_hat"]
        return -torch.fft.irfft2(nl, s=(self.n, self.n))

    def tendency(self, w: Tensor) -> Tensor:
        """Full right-hand side ``∂ω/∂t`` in physical space, ``(N, n, n)``."""
        ops = self._ops(w)
        w_hat = torch.fft.rfft2(w)
        rhs = self._nonlinear_hat(w_hat, ops) + ops["lin"] * w_hat
        return torch.fft.irfft2(rhs, s=(self.n, self.n))

    # ------------------------------------------------------------ time step
    def step(self, w: Tensor, dt: float | None = None) -> Tensor:
        """One integrating-factor RK4 step ``(N, n, n) -> (N, n, n)``.

        With ``E(h) = exp(L h)`` and ``N(·)`` the nonlinear term + forcing:
        ``a = N(ŵ)``, ``b = N(E½(ŵ + h/2 a))``, ``c = N(E½ ŵ + h/2 b)``,
        ``d = N(E ŵ + h E½ c)``,
        ``ŵ' = E ŵ + h/6 (E a + 2 E½ (b + c) + d)``.
        """
        self._check(w)
        h = self.default_dt if dt is None else float(dt)
        ops = self._ops(w)
        e_half = torch.exp(ops["lin"] * (h / 2))
        e_full = e_half * e_half
        w_hat = torch.fft.rfft2(w) * ops["dealias"]
        a = self._nonlinear_hat(w_hat, ops)
        b = self._nonlinear_hat(e_half * (w_hat + 0.5 * h * a), ops)
        c = self._nonlinear_hat(e_half * w_hat + 0.5 * h * b, ops)
        d = self._nonlinear_hat(e_full * w_hat + h * e_half * c, ops)
        w_new = e_full * w_hat + (h / 6.0) * (e_full * a + 2.0 * e_half * (b + c) + d)
        return torch.fft.irfft2(w_new * ops["dealias"], s=(self.n, self.n))

    def cfl_dt(self, w: Tensor, cfl: float = 0.5) -> float:
        """Largest ``dt`` with ``max|u| dt / dx ≤ cfl`` over the batch ``(N, n, n)``."""
        u, v = self.velocity(w)
        umax = float(torch.sqrt(u**2 + v**2).max())
        return cfl * (2 * math.pi / self.n) / max(umax, 1e-12)

    def random_state(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        k_peak: float = 4.0,
        rms: float = 2.0,
    ) -> Tensor:
        """``(n, self.n, self.n)`` random vorticity: white noise filtered to a
        spectrum ``∝ exp(−(|k| − k_peak)²/2)``, zero mean, rescaled to ``rms``.
        Spin up (a few tens of time units) before using it as a turbulent state."""
        z = randn_on((n, self.n, self.n), generator, dtype, device)
        ops = self._ops(z)
        k = torch.sqrt(1.0 / ops["inv_k2"].clamp_min(1e-30))
        filt = torch.exp(-0.5 * (k - k_peak) ** 2) * (ops["inv_k2"] > 0) * ops["dealias"]
        w = torch.fft.irfft2(torch.fft.rfft2(z) * filt, s=(self.n, self.n))
        scale = w.flatten(1).std(dim=1).clamp_min(1e-12)
        return w * (rms / scale)[:, None, None]
