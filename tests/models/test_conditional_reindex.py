"""``ConditionalChain.reindex``: following a resampling without rebuilding the chain.

The diffusion particle filter calls ``chain.reindex(idx)`` after an inner resampling when
the chain has it, else rebuilds the chain from the resampled ``x_k``. Both must give the
same filter bit for bit (global ``(N,)`` and localised ``(D, N)`` indices); the global
path must save the network call that recomputes ``D(x_t[idx])``.
"""

from __future__ import annotations

import pytest
import torch

import models
from assim.filters.base import Ensemble
from assim.filters.dpf import make_dpf
from assim.obs import make_observation
from models.worlds.conditional import ConditionalChain


def _cycles(filt, world, n_cycles: int = 3) -> tuple[list[torch.Tensor], int]:
    """Run ``n_cycles`` cycles on the shipped L96 world; returns states+weights and calls."""
    calls = 0
    net = world.denoiser.net if hasattr(world.denoiser, "net") else world.denoiser

    def count(*_):
        nonlocal calls
        calls += 1

    h = net.register_forward_hook(count)
    g = torch.Generator().manual_seed(0)
    x = 8 + torch.randn(16, 40, generator=g)
    obs = make_observation("every:2", 1.0)
    truth = x[0] + 0.5 * torch.randn(40, generator=g)
    ens, out = Ensemble(x), []
    try:
        for _ in range(n_cycles):
            truth = world.step(truth[None], g)[0]
            y = obs.sample(truth[None], g)[0]
            ens, _ = filt.cycle(world, ens, y, obs, g)
            out += [ens.x.clone(), ens.log_w.clone()]
    finally:
        h.remove()
    return out, calls


@pytest.mark.parametrize("radius", [None, 3.0])
def test_reindex_equals_rebuilding_the_chain(radius, monkeypatch):
    world = models.load("l96").eval()
    opts = dict(steps=3, q=0.15, inner_threshold=1.0)  # resample at every inner step
    if radius is not None:
        opts["radius"] = radius
    with_reindex, calls_reindex = _cycles(make_dpf(world, **opts), world)
    monkeypatch.delattr(ConditionalChain, "reindex")
    rebuilt, calls_rebuilt = _cycles(make_dpf(world, **opts), world)
    for a, b in zip(with_reindex, rebuilt, strict=True):
        assert torch.equal(a, b)
    if radius is None:  # the memo survives a whole-particle resampling: fewer calls
        assert calls_reindex < calls_rebuilt, (calls_reindex, calls_rebuilt)
    else:  # mixed particles: the memo is dropped, the same calls
        assert calls_reindex == calls_rebuilt
