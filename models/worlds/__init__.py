"""World models: learned (diffusion) and physical stochastic transitions."""

from models.worlds.base import DiffusionWorld, TransitionChain, World

__all__ = ["World", "DiffusionWorld", "TransitionChain"]
