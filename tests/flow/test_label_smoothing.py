"""Spatially varying label smoothing: the kernel and the smoothed target by hand, the loss that uses it."""
import math

import pytest
import torch
import torch.nn.functional as F

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.flow.label_smoothing import spatially_smoothed, svls_kernel
from medflowseg_nn.flow.loss import FlowMatchingLoss, cross_entropy_loss
from medflowseg_nn.flow.path import LinearPath

EDGE, CORNER = math.exp(-0.5), math.exp(-1.0)  # sigma 1: distance 1 and sqrt(2)


@pytest.mark.parametrize("dims", [2, 3])
def test_kernel_centre_keeps_half_and_sums_to_one(dims):
    k = svls_kernel(dims, 1.0)
    assert k.shape == (3,) * dims
    assert k.sum().item() == pytest.approx(1.0)
    assert k[(1,) * dims].item() == pytest.approx(0.5)


def test_kernel_2d_weights_by_hand():
    k = svls_kernel(2, 1.0)
    total = 2 * (4 * EDGE + 4 * CORNER)
    assert k[0, 1].item() == pytest.approx(EDGE / total)
    assert k[0, 0].item() == pytest.approx(CORNER / total)


@pytest.mark.parametrize("bad", [(1, 1.0), (2, 0.0), (3, -1.0)])
def test_kernel_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        svls_kernel(*bad)


def vertical_boundary() -> torch.Tensor:
    """[1, 6, 6] labels: columns 0-2 class 0, columns 3-5 class 1."""
    seg = torch.zeros(1, 6, 6, dtype=torch.long)
    seg[..., 3:] = 1
    return seg


def test_boundary_voxels_get_the_neighbours_share_interior_stays_one_hot():
    one_hot = F.one_hot(vertical_boundary(), 2).movedim(-1, 1).float()
    soft = spatially_smoothed(one_hot, 1.0)
    total = 2 * (4 * EDGE + 4 * CORNER)
    across = (EDGE + 2 * CORNER) / total  # one edge and two corner neighbours lie across the boundary
    assert soft[0, 1, 2, 2].item() == pytest.approx(across)  # class-0 voxel next to the boundary
    assert soft[0, 0, 2, 3].item() == pytest.approx(across)  # class-1 voxel next to it
    assert torch.equal(soft[0, :, :, :2], one_hot[0, :, :, :2])  # interior: unchanged
    assert torch.allclose(soft.sum(1), torch.ones(1, 6, 6))  # still a distribution per voxel


def test_replicated_border_keeps_a_uniform_image_one_hot():
    one_hot = F.one_hot(torch.full((2, 4, 5, 3), 2), 3).movedim(-1, 1).float()
    assert torch.allclose(spatially_smoothed(one_hot, 1.0), one_hot)


def test_ignored_voxels_lend_no_label():
    seg = vertical_boundary()
    mask = torch.ones(1, 1, 6, 6)
    mask[..., 3:] = 0  # the class-1 side is ignored
    one_hot = F.one_hot(seg, 2).movedim(-1, 1).float()
    soft = spatially_smoothed(one_hot, 1.0, mask)
    assert torch.allclose(soft[0, 0, :, :3], torch.ones(6, 3))  # kept voxels see only class-0 neighbours


def test_ce_with_smoothing_is_the_soft_target_cross_entropy():
    torch.manual_seed(0)
    seg = vertical_boundary()
    logits = torch.randn(1, 2, 6, 6)
    soft = spatially_smoothed(F.one_hot(seg, 2).movedim(-1, 1).float(), 1.0)
    by_hand = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert cross_entropy_loss(logits, seg, smoothing_sigma=1.0).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert cross_entropy_loss(logits, seg).item() == pytest.approx(F.cross_entropy(logits, seg).item(), rel=1e-6)


def test_bce_with_smoothing_for_regions():
    torch.manual_seed(0)
    regions = vertical_boundary()[:, None].float()  # [1, 1, 6, 6] one region channel
    logits = torch.randn(1, 1, 6, 6)
    soft = spatially_smoothed(regions, 1.0)
    by_hand = F.binary_cross_entropy_with_logits(logits, soft)
    got = cross_entropy_loss(logits, regions, multilabel=True, smoothing_sigma=1.0)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert not torch.equal(soft, regions)


@pytest.mark.parametrize("dims", [2, 3])
def test_flow_loss_only_changes_the_ce_term(dims):
    torch.manual_seed(0)
    shape = (2, 3) + (6,) * dims
    seg = torch.randint(0, 3, (2,) + (6,) * dims)
    x1 = F.one_hot(seg, 3).movedim(-1, 1).float() * 2 - 1
    t = torch.tensor([0.0, 0.5])
    path = LinearPath().sample(torch.randn(shape), x1, t)
    raw = torch.randn(shape, requires_grad=True)
    hard = FlowMatchingLoss()(raw, path, seg)
    smooth = FlowMatchingLoss(smoothing_sigma=1.0)(raw, path, seg)
    assert smooth["mse"].item() == pytest.approx(hard["mse"].item())
    ce_hard = cross_entropy_loss(raw, seg).item()
    ce_smooth = cross_entropy_loss(raw, seg, smoothing_sigma=1.0).item()
    assert smooth["seg"].item() - hard["seg"].item() == pytest.approx(ce_smooth - ce_hard, rel=1e-5, abs=1e-6)
    smooth["loss"].backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


def test_config_reads_the_key_and_refuses_negative():
    assert FlowMatchingConfig().label_smoothing_sigma == 0.0
    assert FlowMatchingConfig.from_dict({"label_smoothing_sigma": 1.0}).label_smoothing_sigma == 1.0
    with pytest.raises(ValueError, match="label_smoothing_sigma"):
        FlowMatchingConfig(label_smoothing_sigma=-1.0)
