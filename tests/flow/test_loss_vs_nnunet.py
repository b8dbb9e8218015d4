"""Our segmentation loss against nnU-Net's ``DC_and_CE_loss`` (what ``nnUNetTrainer._build_loss`` builds).

Findings this file pins down (``x1`` parameterisation, where the Dice + CE logits are the raw network output):

* ``soft_dice_loss`` is nnU-Net's ``MemoryEfficientSoftDiceLoss(batch_dice=True, do_bg=False, smooth=1e-5)``
  plus the constant 1 (nnU-Net returns ``-dice``, we return ``1 - dice``): same gradients.
* It is always the *batch* Dice. nnU-Net follows the plans' ``batch_dice``: True for 2d, False for 3d_fullres
  unless a 3d_lowres configuration exists (``ExperimentPlanner.plan_experiment``), False for 3d_lowres. With
  ``batch_dice=False`` (per-case Dice) values and gradients differ.
* ``FlowMatchingLoss`` adds ``mse_weight`` x MSE(x̂1, x1) to Dice + CE; with the default ``mse_weight=1`` the total
  loss at t = 0 is *not* nnU-Net's. Its ``seg`` term is nnU-Net's (batch Dice) + 1 at every t, not only t = 0.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from medflowseg_nn.flow.loss import FlowMatchingLoss, soft_dice_loss
from medflowseg_nn.flow.path import LinearPath

K = 3


def nnunet_loss(batch_dice: bool) -> DC_and_CE_loss:
    """The loss ``nnUNetTrainer._build_loss`` builds for plain labels, no deep supervision, one process."""
    fake_trainer = SimpleNamespace(label_manager=SimpleNamespace(has_regions=False, ignore_label=None),
                                   configuration_manager=SimpleNamespace(batch_dice=batch_dice), is_ddp=False,
                                   enable_deep_supervision=False, _do_i_compile=lambda: False)
    loss = nnUNetTrainer._build_loss(fake_trainer)
    assert isinstance(loss, DC_and_CE_loss) and loss.dc.batch_dice == batch_dice and not loss.dc.do_bg
    return loss


def batch(spatial, seed=0):
    """Logits and labels whose foreground share differs a lot between the cases (so batch != per-case Dice)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(3, K, *spatial, generator=g)
    seg = torch.randint(0, K, (3, 1, *spatial), generator=g)
    seg[0] = 0
    seg[0, 0, :2] = 1  # case 0: a little of class 1, no class 2
    seg[1, 0, 1:] = 2  # case 1: mostly class 2
    return raw, seg


def value_and_grad(fn, raw):
    x = raw.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("spatial", [(9, 8), (6, 7, 5)])
def test_soft_dice_is_nnunets_batch_dice_plus_one(spatial):
    raw, seg = batch(spatial)
    ours, g_ours = value_and_grad(lambda x: soft_dice_loss(x, seg[:, 0]), raw)
    dice = nnunet_loss(batch_dice=True).dc
    theirs, g_theirs = value_and_grad(lambda x: dice(x, seg), raw)
    assert ours.item() == pytest.approx(theirs.item() + 1, abs=1e-6)
    assert torch.allclose(g_ours, g_theirs, atol=1e-8)


@pytest.mark.parametrize("spatial", [(9, 8), (6, 7, 5)])
def test_soft_dice_is_not_nnunets_per_case_dice(spatial):
    """What nnU-Net trains 3d_fullres with (no 3d_lowres) and 3d_lowres: per-case Dice, averaged."""
    raw, seg = batch(spatial)
    ours, g_ours = value_and_grad(lambda x: soft_dice_loss(x, seg[:, 0]), raw)
    dice = nnunet_loss(batch_dice=False).dc
    theirs, g_theirs = value_and_grad(lambda x: dice(x, seg), raw)
    assert abs(ours.item() - (theirs.item() + 1)) > 1e-2
    assert (g_ours - g_theirs).abs().max() > 1e-3 * g_theirs.abs().max()
    # what per-case Dice means: the mean over cases and foreground classes of each case's own Dice
    probs, onehot = torch.softmax(raw, 1), F.one_hot(seg[:, 0], K).movedim(-1, 1).float()
    axes = tuple(range(2, raw.ndim))
    per_case = (2 * (probs * onehot).sum(axes) + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
    assert theirs.item() == pytest.approx(-per_case[:, 1:].mean().item(), abs=1e-6)


def flow_inputs(raw, seg, t):
    x1 = F.one_hot(seg[:, 0], K).movedim(-1, 1).float() * 2 - 1
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    return LinearPath().sample(x0, x1, torch.full((raw.shape[0],), float(t)))


@pytest.mark.parametrize("t", [0.0, 0.7])
def test_flow_matching_loss_x1_is_nnunets_loss_plus_one_plus_the_mse(t):
    raw, seg = batch((6, 7, 5))
    path = flow_inputs(raw, seg, t)
    nnunet = nnunet_loss(batch_dice=True)
    out = FlowMatchingLoss("x1")(raw, path, seg)
    reference = nnunet(raw, seg).item()
    assert out["seg"].item() == pytest.approx(reference + 1, abs=1e-5)  # the seg logits are raw at any t
    brier = 4 * ((torch.softmax(raw, 1) - (path.x1 + 1) / 2) ** 2).mean()  # MSE(2 softmax - 1, x1)
    assert out["mse"].item() == pytest.approx(brier.item(), rel=1e-5) and out["mse"] > 0.1
    assert out["loss"].item() == pytest.approx(out["mse"].item() + out["seg"].item(), rel=1e-6)
    assert abs(out["loss"].item() - reference) > 1.1  # the default total is not nnU-Net's loss


def test_without_the_mse_the_x1_loss_at_t0_trains_like_nnunets_batch_dice_loss():
    raw, seg = batch((6, 7, 5), seed=3)
    path = flow_inputs(raw, seg, 0.0)
    ours, g_ours = value_and_grad(lambda x: FlowMatchingLoss("x1", mse_weight=0.0)(x, path, seg)["loss"], raw)
    theirs, g_theirs = value_and_grad(lambda x: nnunet_loss(batch_dice=True)(x, seg), raw)
    assert ours.item() == pytest.approx(theirs.item() + 1, abs=1e-5)
    assert torch.allclose(g_ours, g_theirs, atol=1e-8)
    # the default weights (mse_weight = 1) change the gradient
    _, g_default = value_and_grad(lambda x: FlowMatchingLoss("x1")(x, path, seg)["loss"], raw)
    assert (g_default - g_theirs).abs().max() > 0.1 * g_theirs.abs().max()
