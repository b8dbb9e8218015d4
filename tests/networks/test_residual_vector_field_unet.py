"""``ResidualEncoderVectorFieldUNet``: nnU-Net's ResEnc encoder inside the vector field (no nnU-Net needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from torch import nn

from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet


def kwargs(dim: int) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return dict(n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=conv, kernel_sizes=[[3] * dim] * 4,
                strides=[[1] * dim] + [[2] * dim] * 3, n_blocks_per_stage=[1, 3, 4, 6],
                n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


@pytest.mark.parametrize("dim", [2, 3])
def test_encoder_is_residual_with_nnunets_block_counts_and_init(dim):
    torch.manual_seed(0)
    net = ResidualEncoderVectorFieldUNet(2, 3, deep_supervision=True, **kwargs(dim))
    assert isinstance(net, VectorFieldUNet)
    assert [len(s.stage.blocks if s is net.encoder[0] else s.blocks) for s in net.encoder] == [1, 3, 4, 6]
    assert all(isinstance(s, StackedResidualBlocks) for s in list(net.encoder)[1:])
    blocks = [m for m in net.encoder.modules() if isinstance(m, BasicBlockD)]
    assert len(blocks) == 14 and all(float(b.conv2.norm.weight.detach().abs().sum()) == 0 for b in blocks)
    # the stem takes image ⊕ x_t; the conditioning encoder only the image
    assert net.encoder[0].stem.convs[0].conv.in_channels == 2 + 3
    assert net.cond_encoder[0].convs[0].conv.in_channels == 2


@pytest.mark.parametrize("dim", [2, 3])
def test_forward_backward_and_deep_supervision(dim):
    net = ResidualEncoderVectorFieldUNet(1, 3, deep_supervision=True, **kwargs(dim))
    n = 32 if dim == 2 else 16
    size = (n,) * dim
    image, x_t, t = torch.randn(2, 1, *size), torch.randn(2, 3, *size), torch.tensor([0.0, 0.7])
    out = net(image, x_t, t)
    assert [o.shape[2:] for o in out] == [torch.Size(size), torch.Size((n // 2,) * dim), torch.Size((n // 4,) * dim)]
    sum(o.pow(2).mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    assert net(image, x_t, t).shape == (2, 3, *size)


def test_feature_map_size_counts_stem_and_residual_stages_beyond_nnunets():
    k = kwargs(3)
    ours = ResidualEncoderVectorFieldUNet(1, 3, dbsa_stages=[], faa_stages=[], **k)
    theirs = ResidualEncoderUNet(1, num_classes=3, **k)
    size = (32, 32, 32)
    enc = sum(int(s.compute_conv_feature_map_size(sz)) for s, sz in
              zip(ours.encoder, [size, size, (16,) * 3, (8,) * 3]))
    assert enc == int(theirs.encoder.compute_conv_feature_map_size(size))  # the same encoder as nnU-Net's
    assert ours.compute_conv_feature_map_size(size) > theirs.compute_conv_feature_map_size(size)
    assert isinstance(ours.compute_conv_feature_map_size(size), np.integer)
