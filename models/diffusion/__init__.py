"""Diffusion core: schedules, EDM-preconditioned denoisers, samplers with explicit kernels.

API summary (DESIGN.md §2; continuous time ``t in [0, 1]``, noise grows with ``t``;
shapes ``(B, *S)``, batch first; ``t`` is a float, a 0-d tensor or ``(B,)``):

Schedules (``schedules.py``): ``CosineVP(log_snr_min=-10, log_snr_max=12)``,
``LinearVP(beta_min=0.1, beta_max=20)``, ``EDM(sigma_min=0.002, sigma_max=80, rho=7)``
(alias ``VE``; ``alpha = 1``). ``schedule(t) -> (alpha_t, sigma_t)`` with
``x_t = alpha_t x_0 + sigma_t eps``; ``log_snr(t)``, ``dlog_snr(t)``,
``sigma_ratio(t) = sigma_t / alpha_t``, ``drift_diffusion(t) -> (f, g^2)``, and the inverses
``t_of_log_snr(lam)``, ``t_of_sigma_ratio(q)`` (stop a chain at noise level ``q``: the
state then satisfies ``x_t / alpha_t = x_0 + q eps``). All schedules have
``0 < sigma_0`` (tiny) and finite ``log_snr`` at both ends.

Denoiser (``denoisers.py``): ``Denoiser(backbone, schedule, sigma_data=1.0,
t_dist="lognormal"|"uniform", p_mean=-1.2, p_std=1.2)``; ``forward(x_t, t, cond=None) ->
x0_hat``; ``loss(x0, cond=None, generator=None, t=None) -> scalar``;
``score(x_t, t, cond)``. A backbone is ``F(x_in (B, *S), c_noise (B,), cond) -> (B, *S)``.

Samplers (``samplers.py``): ``DDPM(den)``, ``DDIM(den, eta=0.0)``, ``EulerMaruyama(den)``,
``Heun(den)``; ``den`` is anything with ``den(x_t, t, cond) -> x0_hat`` and a
``schedule`` (optionally ``sigma_data``). Each has
``transition(x_t, t, s, cond=None) -> GaussianKernel(mean, var)`` for one step ``t -> s < t``
(``var = 0`` for Heun and DDIM(eta=0); ``log_prob`` then raises ``ValueError``),
``timesteps(steps, t_min=0.0, t_max=1.0) -> (steps + 1,)`` decreasing float64 grid,
``init(shape, t_max, generator, device, dtype)`` prior draw ``N(0, prior_std^2)``, and
``sample(shape, cond=None, steps=64, generator=None, t_min=0.0, t_max=1.0,
return_x0=True, x_init=None, device=None, dtype=None) -> (N, *S)``.
With ``t_min = 0`` and ``return_x0`` the last step returns ``x0_hat``; with ``t_min > 0``
the noisy state at ``t_min`` is returned.

Oracles (``oracles.py``): ``GaussianDenoiser(mu (*S), Sigma (D, D), schedule, A=None)``
(exact ``E[x_0 | x_t]``; with ``A (D, C)`` the mean is ``mu + cond.flatten(1) @ A^T``, i.e.
``p(x_{k+1} | x_k) = N(A x_k + b, Q)``; also ``posterior_cov(t)``, ``sample_x0(n, gen, cond)``)
and ``GaussianMixtureDenoiser(weights (K,), mus (K, *S), Sigmas (K, D, D), schedule)``
(``responsibilities(x_t, t) -> (B, K)``, ``sample_x0(n, gen) -> (x0, labels)``).
``chain_moments(sampler, dim, steps, t_min, t_max, return_x0)``: exact mean/covariance of a
sampler run on an affine (Gaussian) oracle, i.e. its discretisation error without MC noise.

ODE samplers (Heun, DDIM(0)) keep the bias of the zero-mean prior ``N(0, prior_std^2)`` when
the data mean is not 0 (stochastic samplers forget it); pass ``x_init`` to start elsewhere.
"""

from models.diffusion.denoisers import Denoiser
from models.diffusion.kernel import GaussianKernel
from models.diffusion.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from models.diffusion.samplers import DDIM, DDPM, SAMPLERS, EulerMaruyama, Heun, Sampler
from models.diffusion.schedules import EDM, VE, CosineVP, LinearVP, Schedule

__all__ = [
    "Schedule",
    "CosineVP",
    "LinearVP",
    "EDM",
    "VE",
    "Denoiser",
    "GaussianKernel",
    "Sampler",
    "DDPM",
    "DDIM",
    "EulerMaruyama",
    "Heun",
    "SAMPLERS",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
]
