"""The split first convolution: ``forward(image, x_t, t, x_t_projection=x_t_projection(x_t))`` is the plain forward
up to float rounding, for the plain and the residual-encoder field, 2D and 3D (first stage of 1 or 2 blocks); one
image batch for N samples' x_t is the forward of the image repeated N times."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet


def build(kind: str, dim: int, convs_per_stage: int) -> VectorFieldUNet:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    common = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op=conv, kernel_sizes=[[3] * dim] * 3,
                  strides=[[1] * dim] + [[2] * dim] * 2, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                  norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, time_embed_dim=16)
    torch.manual_seed(0)
    if kind == "residual":
        net = ResidualEncoderVectorFieldUNet(2, 3, n_blocks_per_stage=[convs_per_stage, 1, 1], **common)
    else:
        net = VectorFieldUNet(2, 3, n_conv_per_stage=[convs_per_stage, 1, 1], **common)
    with torch.no_grad():  # zero-initialised projections perturbed, so every branch matters
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return net.eval()


@pytest.mark.parametrize("convs_per_stage", [1, 2])
@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_split_first_conv_equals_the_concatenated_input(dim, kind, convs_per_stage):
    net = build(kind, dim, convs_per_stage)
    spatial = (16, 20) if dim == 2 else (8, 12, 8)
    gen = torch.Generator().manual_seed(1)
    image, x_t = torch.randn(2, 2, *spatial, generator=gen), torch.randn(2, 3, *spatial, generator=gen)
    t = torch.tensor([0.0, 0.3])
    with torch.no_grad():
        projection = net.x_t_projection(x_t)
        assert projection.shape == (2, 8, *spatial)
        plain = net(image, x_t, t)
        split = net(image, x_t, t, x_t_projection=projection)
    assert torch.allclose(split, plain, rtol=1e-4, atol=1e-5)
    assert not torch.equal(projection, torch.zeros_like(projection))


def test_projection_state_changes_when_weights_are_loaded():
    net = build("plain", 3, 1)
    before = net.x_t_projection_state()
    assert net.x_t_projection_state() == before
    other = build("plain", 3, 1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    net.load_state_dict(other.state_dict())
    assert net.x_t_projection_state() != before


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_one_image_batch_for_n_samples_is_the_repeated_image(dim, kind):
    net = build(kind, dim, 2)
    spatial = (16, 20) if dim == 2 else (8, 12, 8)
    gen = torch.Generator().manual_seed(2)
    image, x_t = torch.randn(2, 2, *spatial, generator=gen), torch.randn(6, 3, *spatial, generator=gen)
    t = torch.rand(6, generator=gen)
    repeated = image.repeat(3, *([1] * (dim + 1)))  # sample-major: rows n*2 .. n*2+1 are sample n
    with torch.no_grad():
        reference = net(repeated, x_t, t)
        assert torch.allclose(net(image, x_t, t), reference, rtol=1e-4, atol=1e-5)
        split = net(image, x_t, t, x_t_projection=net.x_t_projection(x_t))
        assert torch.allclose(split, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the image batch"):
        net(image, x_t[:5], t[:5])
