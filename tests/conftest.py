"""Shared fixtures: every tensor test runs on each available device."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads only add contention


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one torch thread, restored afterwards: the suite is thousands of
    tiny tensor ops, where intra-op threads only contend on a busy 2-core machine, and
    some code under test (``assim cycle``) sets the thread count itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
