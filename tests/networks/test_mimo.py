"""``MimoVectorField``: M members in the channels of one field — training groups, eval input repetition and the
mean probability, against the inner field called by hand (2D / 3D; plain and residual-encoder inner fields)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.networks.mimo import (MimoVectorField, channels_to_members, mean_probability_logits,
                                         members_to_channels)
from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet

C_IMG, K = 2, 3


def small_field(kind: str, dim: int, image_channels: int, classes: int, seed: int = 0,
                deep_supervision: bool = False, features: tuple = (8, 16, 32)) -> nn.Module:
    """A 3-stage field (plain or residual encoder) with its zero-initialised projections perturbed."""
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    common = dict(n_stages=3, features_per_stage=list(features), conv_op=conv, kernel_sizes=[[3] * dim] * 3,
                  strides=[[1] * dim] + [[2] * dim] * 2, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                  norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, time_embed_dim=16, time_scaled_x_t=True,
                  deep_supervision=deep_supervision)
    cls, blocks = ((ResidualEncoderVectorFieldUNet, {"n_blocks_per_stage": [1, 1, 1]}) if kind == "residual"
                   else (VectorFieldUNet, {"n_conv_per_stage": [1, 1, 1]}))
    torch.manual_seed(seed)
    net = cls(image_channels, classes, **blocks, **common)
    with torch.no_grad():  # zero-initialised projections perturbed, so every branch matters
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return net


def mimo(kind: str, dim: int, members: int, deep_supervision: bool = False) -> MimoVectorField:
    return MimoVectorField(small_field(kind, dim, members * C_IMG, members * K, 0, deep_supervision), members)


def inputs(dim: int, rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = (16, 20) if dim == 2 else (8, 12, 8)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C_IMG, *spatial, generator=gen), torch.randn(rows, K, *spatial, generator=gen)


def test_members_to_channels_and_back_by_hand():
    x = torch.arange(2 * 3 * 2 * 4.0).reshape(6, 2, 4)  # 2 groups of 3 members, 2 channels each
    y = members_to_channels(x, 3)
    assert y.shape == (2, 6, 4)
    assert torch.equal(y[1, 2:4], x[4]) and torch.equal(y[0, 4:6], x[2])  # group 1 member 1, group 0 member 2
    assert torch.equal(channels_to_members(y, 3), x)
    with pytest.raises(ValueError, match="groups of 3"):
        members_to_channels(x[:5], 3)


def test_mean_probability_logits_is_the_log_of_the_members_mean_softmax():
    raw = torch.randn(2, 2 * K, 5, generator=torch.Generator().manual_seed(3))
    by_hand = (torch.softmax(raw[:, :K], 1) + torch.softmax(raw[:, K:], 1)) / 2
    out = mean_probability_logits(raw, 2)
    assert torch.allclose(torch.softmax(out, 1), by_hand, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 5), atol=1e-6)  # already normalised log-probabilities
    same = torch.cat([raw[:, :K], raw[:, :K]], 1)  # identical members: the member's own probabilities
    assert torch.allclose(torch.softmax(mean_probability_logits(same, 2), 1), torch.softmax(raw[:, :K], 1), atol=1e-6)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("members", [2, 3])
def test_training_groups_are_one_inner_row_and_come_back_per_member(dim, kind, members):
    net = mimo(kind, dim, members).train()
    image, x_t = inputs(dim, 2 * members)
    t = torch.tensor([0.0, 0.6]).repeat_interleave(members)
    with torch.no_grad():
        out = net(image, x_t, t)
        inner = net.inner(members_to_channels(image, members), members_to_channels(x_t, members), t[::members])
    assert out.shape == x_t.shape
    for g in range(2):
        for m in range(members):  # row g·M + m is member m's channels of group g's inner output
            assert torch.allclose(out[g * members + m], inner[g, m * K:(m + 1) * K], atol=1e-6)
    with pytest.raises(ValueError, match="share their t"):
        net(image, x_t, torch.linspace(0, 1, 2 * members))


@pytest.mark.parametrize("dim", [2, 3])
def test_training_deep_supervision_outputs_are_regrouped_too(dim):
    net = mimo("plain", dim, 2, deep_supervision=True).train()
    image, x_t = inputs(dim, 4)
    outs = net(image, None, torch.zeros(4))  # prior-free at t = 0
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0].shape == x_t.shape and outs[1].shape == (4, K, *[s // 2 for s in x_t.shape[2:]])


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_eval_repeats_the_input_for_every_member_and_returns_their_mean_probability(dim, kind):
    members = 3
    net = mimo(kind, dim, members).eval()
    image, x_t = inputs(dim, 2)
    t = torch.tensor([0.0, 0.4])
    with torch.no_grad():
        out = net(image, x_t, t)
        raw = net.inner(image.repeat(1, members, *[1] * dim), x_t.repeat(1, members, *[1] * dim), t)
        by_hand = sum(torch.softmax(raw[:, m * K:(m + 1) * K], 1) for m in range(members)) / members
        assert out.shape == x_t.shape and torch.allclose(torch.softmax(out, 1), by_hand, atol=1e-5)
        # the members differ (independently initialised channels), so their mean is not any one of them
        assert not torch.allclose(by_hand, torch.softmax(raw[:, :K], 1), atol=1e-3)
        # prior-free at t = 0 is the same output as any x_t; N samples of one image batch (sample-major)
        t0 = torch.zeros(2)
        assert torch.allclose(net(image, None, t0), net(image, x_t, t0), atol=1e-5)
        two = net(image, torch.cat([x_t, x_t.flip(0)]), torch.cat([t, t]))
        assert torch.allclose(two[:2], out, atol=1e-5)


def test_refuses_an_inner_field_that_is_not_members_worth_and_fewer_than_two_members():
    net = mimo("plain", 2, 2)
    with pytest.raises(ValueError, match="at least 2"):
        MimoVectorField(net.inner, 1)
    with pytest.raises(ValueError, match="members' worth"):
        MimoVectorField(net.inner, 3)
    assert net.input_channels == C_IMG and net.num_classes == K and net.members == 2
    assert net.time_scaled_x_t and not net.has_deep_supervision_heads
