"""Tests for :class:`DualBranchSpatialAttention` (pure PyTorch, no nnU-Net)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.dual_branch_spatial_attention import DualBranchSpatialAttention

logger = logging.getLogger(__name__)

TIME_DIM = 8

# (conv_op, spatial size, channels, cond channels)
CASES = [
    pytest.param(nn.Conv2d, (35, 50), 4, 3, id="2d-odd-35x50"),
    pytest.param(nn.Conv2d, (40, 56), 4, 3, id="2d-even-40x56"),
    pytest.param(nn.Conv3d, (11, 14, 9), 4, 3, id="3d-odd-small"),
    pytest.param(nn.Conv3d, (8, 12, 8), 4, 3, id="3d-even-small"),
    pytest.param(nn.Conv3d, (35, 50, 36), 2, 2, id="3d-hippocampus-35x50x36"),
]


def _make(conv_op: type[nn.Module], c: int, cc: int, time_dim: int | None = TIME_DIM) -> DualBranchSpatialAttention:
    torch.manual_seed(0)
    return DualBranchSpatialAttention(c, cc, conv_op, time_dim=time_dim)


def _inputs(shape: tuple[int, ...], c: int, cc: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c, *shape, generator=g)
    cond = torch.randn(batch, cc, *shape, generator=g)
    temb = torch.randn(batch, TIME_DIM, generator=g)
    return x, cond, temb


def _perturb_proj(block: DualBranchSpatialAttention) -> None:
    with torch.no_grad():
        block.proj.weight.normal_(0.0, 0.1)
        block.proj.bias.normal_(0.0, 0.1)


@pytest.mark.parametrize("conv_op,shape,c,cc", CASES)
def test_shape_and_identity_at_init(conv_op: type[nn.Module], shape: tuple[int, ...], c: int, cc: int) -> None:
    block = _make(conv_op, c, cc)
    x, cond, temb = _inputs(shape, c, cc)
    with torch.no_grad():
        out = block(x, cond, temb)
    assert out.shape == x.shape
    assert torch.allclose(out, x)


@pytest.mark.parametrize("conv_op,shape,c,cc", CASES)
def test_gradients_reach_every_parameter(conv_op: type[nn.Module], shape: tuple[int, ...], c: int, cc: int) -> None:
    block = _make(conv_op, c, cc)
    _perturb_proj(block)
    x, cond, temb = _inputs(shape, c, cc)
    out = block(x, cond, temb)
    (out.square().mean() + out.mean()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, f"no grad for {name}"
        assert torch.count_nonzero(p.grad) > 0, f"all-zero grad for {name}"


@pytest.mark.parametrize("conv_op,shape,c,cc", CASES[:4])
def test_cond_changes_output(conv_op: type[nn.Module], shape: tuple[int, ...], c: int, cc: int) -> None:
    block = _make(conv_op, c, cc)
    _perturb_proj(block)
    x, cond, temb = _inputs(shape, c, cc)
    with torch.no_grad():
        out_a = block(x, cond, temb)
        out_b = block(x, cond + torch.randn_like(cond), temb)
    assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (35, 50)), (nn.Conv3d, (11, 14, 9))])
def test_time_modulation_changes_output(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    block = _make(conv_op, 4, 3)
    _perturb_proj(block)
    x, cond, temb = _inputs(shape, 4, 3)
    with torch.no_grad():
        out_a = block(x, cond, temb)
        out_b = block(x, cond, temb + 1.0)
    assert not torch.allclose(out_a, out_b)


def test_without_time_dim() -> None:
    block = _make(nn.Conv2d, 4, 3, time_dim=None)
    assert block.time_mod is None
    x, cond, _ = _inputs((9, 7), 4, 3)
    with torch.no_grad():
        assert torch.allclose(block(x, cond), x)


def test_tiny_spatial_size_and_bottleneck() -> None:
    """1x1 and 2x3 maps (deepest level) must not break the pooled / normalised paths."""
    block = _make(nn.Conv3d, 4, 3)
    _perturb_proj(block)
    block.train()
    for shape in [(1, 1, 1), (2, 3, 1)]:
        x, cond, temb = _inputs(shape, 4, 3)
        out = block(x, cond, temb)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_rejects_mismatched_spatial_shapes() -> None:
    block = _make(nn.Conv2d, 4, 3)
    x, _, temb = _inputs((8, 8), 4, 3)
    with pytest.raises(ValueError):
        block(x, torch.randn(2, 3, 8, 9), temb)


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv2d, (35, 50)), (nn.Conv3d, (35, 50, 36))])
def test_feature_map_size_estimate(conv_op: type[nn.Module], shape: tuple[int, ...]) -> None:
    block = _make(conv_op, 4, 3)
    n = 1
    for s in shape:
        n *= s
    size = block.compute_conv_feature_map_size(shape)
    assert isinstance(size, int)
    # at least the fused input + one map per local branch, at most a generous bound
    assert (4 + 3) * n + len(block.dilations) * 4 * n <= size <= 100 * 4 * n
    bigger = block.compute_conv_feature_map_size([2 * s for s in shape])
    assert bigger > size
