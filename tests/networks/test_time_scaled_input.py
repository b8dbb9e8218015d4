"""``time_scaled_x_t``: the field sees ``t · x_t``, closed form against the plain field with the same weights (2D,
3D; the plain and the residual-encoder field), also through the cached first-conv projection of x_t."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.flow.own_estimate import one_step_estimate
from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet


def pair(kind: str, dim: int) -> tuple[VectorFieldUNet, VectorFieldUNet]:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    common = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op=conv, kernel_sizes=[[3] * dim] * 3,
                  strides=[[1] * dim] + [[2] * dim] * 2, n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                  norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, time_embed_dim=16)
    cls, blocks = ((ResidualEncoderVectorFieldUNet, {"n_blocks_per_stage": [1, 1, 1]}) if kind == "residual"
                   else (VectorFieldUNet, {"n_conv_per_stage": [1, 1, 1]}))
    plain, scaled = cls(2, 3, **blocks, **common), cls(2, 3, **blocks, **common, time_scaled_x_t=True)
    with torch.no_grad():  # zero-initialised projections perturbed, so every branch matters
        for p in plain.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    scaled.load_state_dict(plain.state_dict())  # no new parameters: the same state dict loads strictly
    return plain.eval(), scaled.eval()


def image_and_x_t(dim: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [batch, 2, *S]`` and ``x_t [batch, 3, *S]``, seeded."""
    spatial = (16, 20) if dim == 2 else (8, 12, 8)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, *spatial, generator=gen), torch.randn(batch, 3, *spatial, generator=gen)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_the_scaled_field_is_the_plain_field_on_t_times_x_t(dim, kind):
    plain, scaled = pair(kind, dim)
    image, x_t = image_and_x_t(dim, 3, seed=1)
    t = torch.tensor([0.0, 0.3, 0.8])
    with torch.no_grad():
        out = scaled(image, x_t, t)
        expected = plain(image, x_t * t.view(-1, *[1] * dim, 1).movedim(-1, 1), t)
        assert torch.allclose(out, expected, atol=1e-5)
        # t = 0: the output does not depend on the prior draw (the one-step prediction sees the image alone)
        assert torch.allclose(out[:1], scaled(image[:1], torch.randn_like(x_t[:1]), t[:1]), atol=1e-5)
        assert not torch.allclose(out[1:], scaled(image[1:], torch.randn_like(x_t[1:]), t[1:]), atol=1e-3)
        # the cached projection of x_t (unscaled, as samplers compute it) is scaled the same way
        via_projection = scaled(image, x_t, t, x_t_projection=scaled.x_t_projection(x_t))
        assert torch.allclose(via_projection, out, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_the_prior_free_evaluation_is_the_t0_output_for_any_x_t(dim, kind):
    """``x_t=None`` at t = 0: the first conv sees the image alone; same output as any x_t (and its projection)."""
    _, scaled = pair(kind, dim)
    image, x_t = image_and_x_t(dim, 2, seed=2)
    t0 = torch.zeros(2)
    with torch.inference_mode():  # the oneDNN route of the image conv too (batch 1 below)
        free = scaled(image, None, t0)
        assert free.shape == x_t.shape
        assert torch.allclose(free, scaled(image, x_t, t0), atol=1e-5)
        assert torch.allclose(free, scaled(image, x_t, t0, x_t_projection=scaled.x_t_projection(x_t)), atol=1e-5)
        assert torch.allclose(scaled(image[:1], None, t0[:1]), free[:1], atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_the_prior_free_own_estimate_is_the_estimate_from_the_prior(dim):
    """The trainer's own-estimate pass (``one_step_estimate(prior_free=True)``) equals the one from x0."""
    _, scaled = pair("plain", dim)
    image, x0 = image_and_x_t(dim, 2, seed=3)
    with torch.no_grad():
        free = one_step_estimate(scaled, image, x0, "x1", prior_free=True)
        assert torch.allclose(free, one_step_estimate(scaled, image, x0, "x1"), atol=1e-5)


def test_the_prior_free_evaluation_is_refused_where_x_t_matters():
    plain, scaled = pair("plain", 2)
    image = torch.randn(1, 2, 16, 20)
    with pytest.raises(ValueError, match="prior-free"):
        plain(image, None, torch.zeros(1))  # the plain input: x_t is read at t = 0
    with pytest.raises(ValueError, match="prior-free"):
        scaled(image, None, torch.tensor([0.5]))  # t > 0: t · x_t is not zero
