"""Batched torch simulators ``(N, *S)``: Lorenz-63, Lorenz-96, 2-D Kolmogorov flow.

Each has ``tendency(x)``, ``step(x, dt)``, ``integrate(x0, n_steps, dt, spinup)``
and ``random_state(n, generator)``; dtype and device follow the input.
"""

from models.physics.base import Simulator, rk4_step
from models.physics.kolmogorov import Kolmogorov
from models.physics.lorenz63 import Lorenz63
from models.physics.lorenz96 import Lorenz96

__all__ = ["Simulator", "rk4_step", "Lorenz63", "Lorenz96", "Kolmogorov"]
