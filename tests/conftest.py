"""Shared fixtures: every tensor test runs on each available device."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads only add contention

_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=_DEVICES)
def device(request) -> torch.device:
    """Parametrise a test over cpu and cuda; cuda cases skip cleanly without a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A seeded CPU generator factory: ``gen(seed)``."""

    def make(seed: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    return make
