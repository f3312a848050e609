"""Data assimilation with diffusion world models and sequential Monte Carlo."""

__version__ = "0.1.0"
