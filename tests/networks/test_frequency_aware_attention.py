"""Tests for :class:`FrequencyAwareAttention` (pure PyTorch, no nnU-Net)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.frequency_aware_attention import FrequencyAwareAttention, normalised_radius

logger = logging.getLogger(__name__)

TIME_DIM = 8

# (conv_op, spatial size, channels)
CASES = [
    pytest.param(nn.Conv2d, (35, 50), 4, id="2d-odd-35x50"),
    pytest.param(nn.Conv2d, (40, 56), 4, id="2d-even-40x56"),
    pytest.param(nn.Conv3d, (11, 14, 9), 4, id="3d-odd-small"),
    pytest.param(nn.Conv3d, (8, 12, 8), 4, id="3d-even-small"),
    pytest.param(nn.Conv3d, (35, 50, 36), 2, id="3d-hippocampus-35x50x36"),
]


def _make(conv_op: type[nn.Module], c: int, num_bands: int = 8) -> FrequencyAwareAttention:
    torch.manual_seed(0)
    return FrequencyAwareAttention(c, conv_op, time_dim=TIME_DIM, num_bands=num_bands)


def _inputs(shape: tuple[int, ...], c: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, c, *shape, generator=g), torch.randn(batch, TIME_DIM, generator=g)


def _perturb(block: FrequencyAwareAttention) -> None:
    """Make the zero projection nonzero and the bands non-identity."""
    with torch.no_grad():
        block.proj.weight.normal_(0.0, 0.1)
        block.proj.bias.normal_(0.0, 0.1)
        block.bands.add_(0.1 * torch.randn_like(block.bands))


@pytest.mark.parametrize("conv_op,shape,c", CASES)
def test_shape_and_identity_at_init(conv_op: type[nn.Module], shape: tuple[int, ...], c: int) -> None:
    block = _make(conv_op, c)
    x, temb = _inputs(shape, c)
    with torch.no_grad():
        out = block(x, temb)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.allclose(out, x)


@pytest.mark.parametrize("conv_op,shape,c", CASES)
def test_fft_round_trip_identity_filter(conv_op: type[nn.Module], shape: tuple[int, ...], c: int) -> None:
    block = _make(conv_op, c)
    x, _ = _inputs(shape, c)
    with torch.no_grad():
        y = block.spectral_filter(x)
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("conv_op,shape,c", CASES)
def test_gradients_reach_every_parameter(conv_op: type[nn.Module], shape: tuple[int, ...], c: int) -> None:
    block = _make(conv_op, c)
    _perturb(block)
    x, temb = _inputs(shape, c)
    out = block(x, temb)
    (out.square().mean() + out.mean()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.count_nonzero(p.grad) > 0, f"all-zero grad for {name}"
    # every band of every channel is used by some frequency bin
    assert (block.bands.grad != 0).all()


@pytest.mark.parametrize(
    "conv_op,shape_a,shape_b",
    [(nn.Conv2d, (35, 50), (40, 56)), (nn.Conv3d, (11, 14, 9), (8, 12, 8))],
)
def test_same_parameters_any_size(
    conv_op: type[nn.Module], shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    block = _make(conv_op, 4)
    _perturb(block)
    for shape in (shape_a, shape_b, shape_a):
        x, temb = _inputs(shape, 4)
        with torch.no_grad():
            out = block(x, temb)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
    assert len(block._interp_cache) == 2  # one cached grid per (shape, device)


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (35, 50)), (nn.Conv3d, (11, 14, 9))])
def test_autocast_bf16_keeps_fft_in_float32(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    block = _make(conv_op, 4)
    _perturb(block)
    x, temb = _inputs(shape, 4)
    with torch.no_grad():
        ref_spec = block.spectral_filter(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spec = block.spectral_filter(x)
            spec_bf16_in = block.spectral_filter(x.bfloat16())
            out = block(x, temb)
    assert spec.dtype == torch.float32
    assert spec_bf16_in.dtype == torch.float32
    assert torch.allclose(spec, ref_spec, atol=1e-5)
    assert out.dtype == torch.float32
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (35, 50)), (nn.Conv3d, (8, 12, 8))])
def test_time_modulation_changes_output(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    block = _make(conv_op, 4)
    _perturb(block)
    x, temb = _inputs(shape, 4)
    with torch.no_grad():
        out_a = block(x, temb)
        out_b = block(x, temb + 1.0)
    assert not torch.allclose(out_a, out_b)


def test_band_filter_is_low_pass_when_high_bands_zeroed() -> None:
    """Zeroing every band except DC leaves (approximately) the per-channel mean."""
    block = _make(nn.Conv2d, 4, num_bands=8)
    x, _ = _inputs((16, 16), 4)
    with torch.no_grad():
        block.bands.zero_()
        block.bands[:, 0] = 1.0
        y = block.spectral_filter(x)
    # only bins with r < 1/7 survive -> strongly smoothed output, energy drops a lot
    assert y.square().mean() < 0.2 * x.square().mean()
    assert torch.allclose(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("shape", [(35, 50), (40, 56), (11, 14, 9), (8, 12, 8)])
def test_normalised_radius_range(shape: tuple[int, ...]) -> None:
    r = normalised_radius(shape)
    assert r.shape == (*shape[:-1], shape[-1] // 2 + 1)
    assert r.min() == 0.0 and r.flatten()[0] == 0.0
    assert r.max() <= 1.0
    if all(s % 2 == 0 for s in shape):
        assert math.isclose(float(r.max()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (35, 50)), (nn.Conv3d, (35, 50, 36))])
def test_feature_map_size_estimate(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    block = _make(conv_op, 4)
    n = math.prod(shape)
    nf = math.prod(shape[:-1]) * (shape[-1] // 2 + 1)
    size = block.compute_conv_feature_map_size(shape)
    assert isinstance(size, int)
    assert size >= 4 * n + 2 * 4 * nf  # at least input copy + complex spectrum
    assert size <= 100 * 4 * n
    assert block.compute_conv_feature_map_size([2 * s for s in shape]) > size


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (12, 10)), (nn.Conv3d, (8, 12, 8))])
def test_training_after_inference_mode_on_the_same_shape(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    """Predict (torch.inference_mode), then train on the same patch size: the cached rfft-grid tensors of
    inference mode must not reach autograd ("Inference tensors cannot be saved for backward")."""
    block = _make(conv_op, 2)
    _perturb(block)
    x, temb = _inputs(shape, 2)
    with torch.inference_mode():
        expected = block(x, temb)
    out = block(x, temb)
    out.square().mean().backward()
    assert block.bands.grad is not None and torch.allclose(out.detach(), expected, atol=1e-6)
