"""The fast ResNet1d path computes the function of the plain module path.

``ResNet1d.forward`` (channels-last rows, fused SiLU + periodic halo, memoised weights,
the output convolution as one matrix product over the taps) must equal, up to float32
rounding, the original network: here rebuilt from the state dict with
``torch.nn.functional`` only (circular ``F.pad`` + ``F.conv1d``, ``F.group_norm``,
``F.silu``, ``F.linear``), independently of the module code, and also
``ResNet1d.forward_reference`` (the module path, which must equal it bit for bit).

Tolerances: the fast path reorders the float32 sums of each 320-term convolution dot
product and of the GroupNorm statistics, so each layer differs by a few ulp
(eps = 1.2e-7) of its activations; through the 10 layers of ``l96.pt`` the output
differs by ~3e-7 of its largest value (measured). The bound asked of the speed-up is
1e-6 relative, float32: ``|fast - ref| <= 1e-6 * (|ref| + max |ref|)`` elementwise. A
wrong tap, dilation, halo, group or a stale memoised weight gives O(1e-2..1) errors.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models.backbones.resnet1d import ResNet1d, rows_weight, silu_halo, taps_conv, to_rows

CKPT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "l96.pt"
RTOL = 1e-6


@contextlib.contextmanager
def _no_tf32():
    """CUDA convolutions may use TF32 (10-bit mantissa) by default: not float32."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _assert_equiv(fast: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast, ref, rtol=rtol, atol=rtol * scale)


def _conv(x, sd, name, dilation=1):
    """The original ``nn.Conv1d(padding_mode="circular")``: circular pad then conv."""
    w, b = sd[f"{name}.weight"], sd[f"{name}.bias"]
    p = dilation * (w.shape[-1] // 2)
    return F.conv1d(F.pad(x, (p, p), mode="circular"), w, b, dilation=dilation)


def _gn(x, sd, name):
    w = sd[f"{name}.weight"]
    groups = next(g for g in (8, 4, 2, 1) if w.shape[0] % g == 0)
    return F.group_norm(x, groups, w, sd[f"{name}.bias"], 1e-5)


def _reference(sd, x, c_noise, cond, depth, dilations=(1, 2)):
    """The original ResNet1d math on a state dict (keys of the checkpoint's backbone)."""
    h = x.unsqueeze(1) if x.ndim == 2 else x
    if cond is not None:
        h = torch.cat([h, cond.unsqueeze(1) if cond.ndim == 2 else cond], 1)
    c = torch.as_tensor(c_noise, device=x.device).reshape(-1).expand(h.shape[0])
    arg = c.reshape(-1, 1) * sd["time.fourier.freqs"]
    e = torch.cat([arg.cos(), arg.sin()], -1)
    e = F.linear(F.silu(F.linear(e, sd["time.mlp.0.weight"], sd["time.mlp.0.bias"])),
                 sd["time.mlp.2.weight"], sd["time.mlp.2.bias"])  # fmt: skip
    h = _conv(h, sd, "inp")
    for i in range(depth):
        d, blk = dilations[i % len(dilations)], f"blocks.{i}"
        z = _conv(F.silu(_gn(h, sd, f"{blk}.norm1")), sd, f"{blk}.conv1", d)
        z = z + F.linear(e, sd[f"{blk}.emb.weight"], sd[f"{blk}.emb.bias"])[:, :, None]
        h = h + _conv(F.silu(_gn(z, sd, f"{blk}.norm2")), sd, f"{blk}.conv2", d)
    return _conv(F.silu(_gn(h, sd, "out.0")), sd, "out.2").reshape(x.shape)


@pytest.fixture(scope="module")
def l96_world():
    return models.load(str(CKPT), device="cpu").eval()


def _inputs(device, gen, b=64, n=40, seed=0):
    g = gen(seed, device)
    x = 2.0 * torch.randn(b, n, generator=g, device=device)
    cond = 3.0 * torch.randn(b, 1, n, generator=g, device=device)
    return x, cond


@pytest.mark.parametrize("sigma", [0.002, 0.15, 1.0, 20.0])
def test_shipped_l96_backbone_fast_equals_original(l96_world, sigma, device, gen):
    """``l96.pt``'s backbone on 64 random particles, noise levels across the EDM range,
    scalar and per-row ``c_noise``: fast path == original math (1e-6 relative), and the
    module reference path == original math exactly."""
    net = l96_world.denoiser.backbone.to(device)
    sd = {k: v.to(device) for k, v in net.state_dict().items()}
    x, cond = _inputs(device, gen)
    c_rows = torch.log(torch.full((64,), sigma, device=device)) / 4
    c_rows = c_rows + 0.01 * torch.randn(64, generator=gen(5, device), device=device)
    with torch.inference_mode(), _no_tf32():
        for c in (torch.tensor(float(torch.log(torch.tensor(sigma))) / 4), c_rows):
            ref = _reference(sd, x, c, cond, depth=4)
            _assert_equiv(net(x, c, cond), ref)
            torch.testing.assert_close(net.forward_reference(x, c, cond), ref, rtol=0, atol=0)
    net.to("cpu")


def test_shipped_l96_denoiser_fast_equals_original(l96_world, gen, monkeypatch):
    """The world's denoiser ``x0_hat`` (EDM preconditioning around the backbone) at every
    diffusion time of the transition chain, fast vs module path, in the float32 of the
    filter (1e-6 relative)."""
    world = l96_world
    x, _ = _inputs("cpu", gen, seed=1)
    chain = world.transition_sampler(x)
    z = torch.randn(x.shape, generator=gen(2))
    net = world.denoiser.backbone
    with torch.inference_mode():
        fast = [world.denoiser(z, t, chain.cond) for t in chain.times[:-1]]
        monkeypatch.setattr(net, "forward", net.forward_reference)
        ref = [world.denoiser(z, t, chain.cond) for t in chain.times[:-1]]
    for a, b in zip(fast, ref, strict=True):
        _assert_equiv(a, b)


@pytest.mark.parametrize(
    "kw, shape, cond_shape",
    [
        (dict(channels=2, cond_channels=1, width=16, depth=3, dilations=(1, 2, 3)), (3, 2, 24),
         (3, 24)),
        (dict(channels=1, cond_channels=0, width=12, depth=2, kernel_size=3), (5, 9), None),
        (dict(channels=1, cond_channels=2, width=8, depth=1, dilations=(2,)), (1, 1, 8),
         (1, 2, 8)),
    ],
)  # fmt: skip
def test_fast_path_other_configs(kw, shape, cond_shape, device, gen):
    """Several channels (the transposed output), no context, kernel 3, dilation 3, a grid
    just long enough for the halo (n = 2p), batch 1: fast == original math, float32 and
    float64 (1e-12 relative)."""
    torch.manual_seed(0)
    for dtype, rtol in ((torch.float32, RTOL), (torch.float64, 1e-12)):
        net = ResNet1d(**kw).to(device, dtype)
        g = gen(3, device)
        x = torch.randn(shape, generator=g, device=device, dtype=dtype)
        cond = None if cond_shape is None else torch.randn(cond_shape, generator=g,
                                                           device=device, dtype=dtype)  # fmt: skip
        c = torch.linspace(-1.5, 1.2, shape[0], device=device, dtype=dtype)
        sd = net.state_dict()
        with torch.no_grad(), _no_tf32():
            ref = _reference(sd, x, c, cond, kw["depth"], kw.get("dilations", (1, 2)))
            _assert_equiv(net(x, c, cond), ref, rtol)


def test_fast_path_gradients_match(device, gen):
    """Training goes through the fast path too: gradients w.r.t. every parameter and the
    input equal those of the module path (float64, 1e-10 relative)."""
    torch.manual_seed(0)
    net = ResNet1d(channels=1, cond_channels=1, width=16, depth=2).to(device, torch.float64)
    g = gen(4, device)
    x = torch.randn(6, 20, generator=g, device=device, dtype=torch.float64)
    cond = torch.randn(6, 20, generator=g, device=device, dtype=torch.float64)
    c = torch.linspace(-1.0, 1.0, 6, device=device, dtype=torch.float64)
    grads = []
    for fwd in (net.forward, net.forward_reference):
        net.zero_grad()
        xi = x.clone().requires_grad_(True)
        (fwd(xi, c, cond) ** 2).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        _assert_equiv(a, b, 1e-10)


def test_memoised_weights_follow_updates(gen):
    """The channels-last weight copies memoised for inference are refreshed after an
    in-place update, ``load_state_dict`` and a dtype change: the output then equals, bit
    for bit, that of a fresh network built from the same weights (a stale copy would give
    the old network: O(1) differences)."""

    def fresh(sd, dtype=torch.float32):
        other = ResNet1d(channels=1, cond_channels=0, width=8, depth=1).to(dtype)
        other.load_state_dict(sd)
        return other

    torch.manual_seed(0)
    net = ResNet1d(channels=1, cond_channels=0, width=8, depth=1)
    x = torch.randn(4, 16, generator=gen(6))
    c = torch.zeros(4)
    g = gen(8)
    new_sd = {k: v * (1 + 0.2 * torch.rand(v.shape, generator=g)) for k, v in
              net.state_dict().items()}  # fmt: skip
    with torch.no_grad():
        net(x, c)  # fills the memo
        assert rows_weight(net.blocks[0].conv1) is rows_weight(net.blocks[0].conv1)
        net.blocks[0].conv1.weight.mul_(-2.0)
        assert torch.equal(net(x, c), fresh(net.state_dict())(x, c))
        _assert_equiv(net(x, c), _reference(net.state_dict(), x, c, None, 1))
        net.load_state_dict(new_sd)
        assert torch.equal(net(x, c), fresh(new_sd)(x, c))
        _assert_equiv(net(x, c), _reference(new_sd, x, c, None, 1))
        net.double()
        xd, cd = x.double(), c.double()
        assert torch.equal(net(xd, cd), fresh(new_sd, torch.float64)(xd, cd))
        _assert_equiv(net(xd, cd), _reference(net.state_dict(), xd, cd, None, 1), 1e-12)


def test_input_gradient_of_frozen_net_after_inference(device, gen):
    """A frozen network first run under ``inference_mode`` (memoised weights), then
    differentiated w.r.t. its input (a DPS twist): the gradient equals the module path's."""
    torch.manual_seed(0)
    net = ResNet1d(channels=1, cond_channels=1, width=8, depth=2).to(device).requires_grad_(False)
    g = gen(9, device)
    x = torch.randn(5, 16, generator=g, device=device)
    cond = torch.randn(5, 16, generator=g, device=device)
    c = torch.full((5,), 0.2, device=device)
    with torch.inference_mode(), _no_tf32():
        net(x, c, cond)
    grads = []
    with _no_tf32():
        for fwd in (net.forward, net.forward_reference):
            xi = x.clone().requires_grad_(True)
            (fwd(xi, c, cond) ** 2).sum().backward()
            grads.append(xi.grad)
    _assert_equiv(grads[0], grads[1], 1e-5)


def test_resblock_accepts_plain_layout(gen):
    """``ResBlock1d`` called on ``(B, width, n)`` (its public signature) returns the module
    path's ``(B, width, n)``."""
    torch.manual_seed(0)
    blk = ResNet1d(width=16, depth=2).blocks[1]
    h = torch.randn(3, 16, 12, generator=gen(10))
    e = torch.randn(3, 64, generator=gen(11))
    with torch.no_grad():
        out = blk(h, e)
        assert out.shape == h.shape
        _assert_equiv(out, blk.forward_reference(h, e))


def test_halo_and_taps_helpers(gen):
    """``silu_halo`` equals circular ``F.pad`` of the SiLU (to 1 ulp, with and without
    autograd; exactly when it only pads); ``taps_conv`` equals the circular convolution;
    too short a grid is a clear error."""
    x = torch.randn(3, 5, 11, generator=gen(7))
    rows = to_rows(x)
    want = F.pad(F.silu(x), (3, 3), mode="circular")
    # the SiLU runs over channels-last memory (and, without autograd, straight into the
    # strided interior): scalar tail loops may round differently from vector ones (1 ulp)
    ulp = dict(rtol=2.5e-7, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(silu_halo(rows, 3)[:, :, 0], want, **ulp)
    torch.testing.assert_close(silu_halo(rows.requires_grad_(True), 3)[:, :, 0], want, **ulp)
    assert torch.equal(silu_halo(rows.detach(), 2, act=False)[:, :, 0],
                       F.pad(x, (2, 2), mode="circular"))  # fmt: skip
    conv = torch.nn.Conv1d(5, 2, 5, padding=4, dilation=2, padding_mode="circular")
    with torch.no_grad():
        got = taps_conv(conv, silu_halo(rows.detach(), 4, act=False))
        _assert_equiv(got, conv(x))
        with pytest.raises(ValueError, match="grid length"):
            silu_halo(to_rows(x[..., :3]), 4)
