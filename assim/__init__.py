"""Data assimilation with diffusion world models and sequential Monte Carlo."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy exports, so that ``import assim`` stays light (no xarray, no tqdm)."""
    if name == "run":
        from assim.runner import run

        return run
    raise AttributeError(f"module 'assim' has no attribute {name!r}")
