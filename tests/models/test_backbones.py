"""Backbones: shapes, context channels, exact shift equivariance, resolution agnosticism."""

from __future__ import annotations

import pytest
import torch

from models.backbones import FNO, MLP, ResNet1d, UNet2d
from models.backbones.fno import SpectralConv
from models.diffusion.denoisers import Denoiser
from models.diffusion.schedules import CosineVP

F64 = torch.float64


def _c(b, device):
    return torch.linspace(-1.5, 1.2, b, dtype=F64, device=device)


def test_mlp_shapes_and_cond(device, gen):
    torch.manual_seed(0)
    net = MLP(features=6, cond_features=4).to(device, F64)
    x = torch.randn(3, 2, 3, generator=gen(0, device), dtype=F64, device=device)
    c = torch.randn(3, 4, generator=gen(1, device), dtype=F64, device=device)
    assert net(x, _c(3, device), c).shape == x.shape
    with pytest.raises(ValueError, match="cond"):
        net(x, _c(3, device))
    with pytest.raises(ValueError, match="features"):
        net(torch.zeros(3, 5, dtype=F64, device=device), _c(3, device), c)


@pytest.mark.parametrize("shift", [1, 7, -13])
def test_resnet1d_is_exactly_shift_equivariant(shift, device, gen):
    """F(roll(x), roll(cond)) == roll(F(x, cond)) to float64 rounding, for every shift."""
    torch.manual_seed(0)
    net = ResNet1d(channels=2, cond_channels=1, width=16, depth=3).to(device, F64)
    x = torch.randn(4, 2, 40, generator=gen(0, device), dtype=F64, device=device)
    c = torch.randn(4, 40, generator=gen(1, device), dtype=F64, device=device)
    y = net(x, _c(4, device), c)
    y_rolled = net(torch.roll(x, shift, -1), _c(4, device), torch.roll(c, shift, -1))
    torch.testing.assert_close(y_rolled, torch.roll(y, shift, -1), rtol=0, atol=1e-12)
    assert not torch.allclose(y, torch.roll(y, 1, -1))  # the output is not trivially constant
    one = ResNet1d(width=8, depth=1).to(device, F64)
    assert one(x[:, 0], _c(4, device)).shape == (4, 40)


@pytest.mark.parametrize("shift", [(1, 0), (0, 3), (5, -7)])
def test_unet2d_is_exactly_shift_equivariant(shift, device, gen):
    """Adaptive polyphase down/up-sampling makes every circular shift exact (not only
    multiples of the stride), for 3 resolution levels."""
    torch.manual_seed(0)
    net = UNet2d(channels=1, cond_channels=2, width=8, mults=(1, 2, 2)).to(device, F64)
    x = torch.randn(2, 16, 12, generator=gen(0, device), dtype=F64, device=device)
    c = torch.randn(2, 2, 16, 12, generator=gen(1, device), dtype=F64, device=device)
    y = net(x, _c(2, device), c)
    dims = (-2, -1)
    y_rolled = net(torch.roll(x, shift, dims), _c(2, device), torch.roll(c, shift, dims))
    torch.testing.assert_close(y_rolled, torch.roll(y, shift, dims), rtol=0, atol=1e-12)


def test_unet2d_longitude_only_periodicity_and_odd_sizes(device, gen):
    torch.manual_seed(0)
    mask = (torch.rand(15, 13, generator=gen(2)) > 0.3).to(F64)
    net = UNet2d(width=8, mults=(1, 2), periodic=(False, True), mask=mask).to(device, F64)
    x = torch.randn(3, 15, 13, generator=gen(0, device), dtype=F64, device=device)
    y = net(x, _c(3, device))
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="mask"):
        net(torch.zeros(3, 16, 13, dtype=F64, device=device), _c(3, device))
    # periodic in longitude on an even grid: equivariant to longitude shifts
    net2 = UNet2d(width=8, mults=(1, 2), periodic=(False, True)).to(device, F64)
    x = torch.randn(3, 10, 16, generator=gen(3, device), dtype=F64, device=device)
    torch.testing.assert_close(
        net2(torch.roll(x, 5, -1), _c(3, device)),
        torch.roll(net2(x, _c(3, device)), 5, -1),
        rtol=0,
        atol=1e-12,
    )


def test_spectral_conv_is_resolution_agnostic(gen):
    """On a band-limited function (modes below the kept ones), the spectral convolution of
    its samples at 32 and 64 points agrees at the shared points: same operator, any grid."""
    torch.manual_seed(0)
    conv = SpectralConv(2, 3, (6, 5)).to(F64)
    k = torch.arange(4, dtype=F64)
    coef = torch.randn(2, 4, 4, generator=gen(0), dtype=F64)

    def field(n):
        g = torch.arange(n, dtype=F64) / n * 2 * torch.pi
        return torch.einsum(
            "cij,ix,jy->cxy", coef, torch.cos(k[:, None] * g), torch.sin(k[:, None] * g + 0.3)
        )[None]

    y32, y64 = conv(field(32)), conv(field(64))
    torch.testing.assert_close(y64[..., ::2, ::2], y32, rtol=0, atol=1e-10)
    conv1 = SpectralConv(1, 1, (4,)).to(F64)
    g = lambda n: torch.sin(torch.arange(n, dtype=F64) / n * 2 * torch.pi)[None, None]  # noqa: E731
    torch.testing.assert_close(conv1(g(48))[..., ::3], conv1(g(16)), rtol=0, atol=1e-12)


def test_fno_runs_at_untrained_resolutions(device, gen):
    """Train a few steps at 16x16, then denoise at 24x24 and 40x32 (and fewer points than
    modes): shapes follow the input and the loss stays finite; 1-D FNO too."""
    torch.manual_seed(0)
    den = Denoiser(FNO(channels=1, cond_channels=1, modes=(6, 6), width=8, depth=2), CosineVP())
    den = den.to(device)
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    g = gen(0, device)
    for _ in range(3):
        x0 = torch.randn(4, 16, 16, generator=g, device=device)
        loss = den.loss(x0, cond=x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for shape in ((24, 24), (40, 32), (8, 6)):
        x = torch.randn(2, *shape, generator=g, device=device)
        assert den(x, 0.5, cond=x).shape == x.shape
        assert torch.isfinite(den.loss(x, cond=x, generator=g))
    net1 = FNO(modes=(8,), width=8, depth=2).to(device)
    for n in (40, 64):
        assert net1(torch.randn(3, n, generator=g, device=device), _c(3, device)).shape == (3, n)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MLP(8), (2, 8)),
        (lambda: ResNet1d(width=8, depth=2), (2, 12)),
        (lambda: UNet2d(width=8), (2, 8, 8)),
        (lambda: FNO(modes=(4, 4), width=8, depth=2), (2, 8, 8)),
    ],
)
def test_backbones_train_through_the_denoiser(make, shape, gen):
    """Gradients reach every parameter (no dead branch), via the Denoiser loss."""
    torch.manual_seed(0)
    den = Denoiser(make(), CosineVP())
    den.loss(torch.randn(*shape, generator=gen(0)), generator=gen(1)).backward()
    dead = [n for n, p in den.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
