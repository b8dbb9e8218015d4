"""Regions (sigmoid per channel) and the ignore label in the flow's label space and loss.

Closed forms of the sigmoid ``x1`` parameterisation; our Dice + BCE / CE against nnU-Net's region and ignore-label
losses (what ``nnUNetTrainer._build_loss`` builds); ignored voxels change no loss term and no gradient.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from medflowseg_nn.flow.label_space import (LabelTarget, encode_labels, encode_regions, prior_where_ignored,
                                            target_to_logits, target_to_segmentation)
from medflowseg_nn.flow.loss import FlowMatchingLoss, cross_entropy_loss, interpret_output, soft_dice_loss
from medflowseg_nn.flow.path import LinearPath

R = 3


def nnunet_loss(regions: bool, ignore_label):
    """The loss ``nnUNetTrainer._build_loss`` builds (batch Dice, no deep supervision, one process)."""
    fake = SimpleNamespace(label_manager=SimpleNamespace(has_regions=regions, ignore_label=ignore_label),
                           configuration_manager=SimpleNamespace(batch_dice=True), is_ddp=False,
                           enable_deep_supervision=False, _do_i_compile=lambda: False)
    loss = nnUNetTrainer._build_loss(fake)
    assert isinstance(loss, DC_and_BCE_loss if regions else DC_and_CE_loss)
    return loss


def region_batch(spatial=(6, 7, 5), seed=0, ignore=True):
    """Raw outputs ``[2, R, *S]`` and nnU-Net's bool region target ``[2, R + 1, *S]`` (last channel: ignore)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, R, *spatial, generator=g) * 2
    regions = torch.rand(2, R, *spatial, generator=g) > 0.6
    ignored = torch.rand(2, 1, *spatial, generator=g) < (0.4 if ignore else 0.0)
    return raw, torch.cat([regions & ~ignored, ignored], 1)


def value_and_grad(fn, raw):
    x = raw.clone().requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9])
def test_sigmoid_x1_parameterisation_closed_form(t):
    raw, _ = region_batch()
    x_t = torch.randn_like(raw)
    tt = torch.full((raw.shape[0],), t)
    out = interpret_output(raw, x_t, tt, "x1", multilabel=True)
    assert torch.allclose(out.x1_hat, torch.tanh(raw / 2), atol=1e-6)  # 2 sigmoid(o) - 1
    assert torch.allclose(out.velocity, (torch.tanh(raw / 2) - x_t) / (1 - t), atol=1e-5)
    assert torch.equal(out.logits, raw)
    # one Euler step from t lands on x̂1; channels are independent (no softmax coupling)
    assert torch.allclose(x_t + (1 - t) * out.velocity, out.x1_hat, atol=1e-5)
    assert not torch.allclose(out.x1_hat.sum(1), interpret_output(raw, x_t, tt, "x1").x1_hat.sum(1))


def test_region_target_and_back():
    raw, target = region_batch()
    encoded = encode_regions(target, has_ignore=True)
    assert encoded.x1.shape == raw.shape and set(encoded.x1.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(encoded.mask, (~target[:, -1:]).float())
    assert torch.equal(encoded.labels, target[:, :-1].float())
    assert torch.equal(target_to_segmentation(encoded.x1, multilabel=True), target[:, :-1].long())
    # per-region log-odds: sigmoid gives (x + 1) / 2 back (clamped)
    x = torch.tanh(raw / 2)
    assert torch.allclose(torch.sigmoid(target_to_logits(x, multilabel=True)), ((x + 1) / 2).clamp(1e-4, 1 - 1e-4),
                          atol=1e-5)
    plain = encode_regions(target[:, :-1], has_ignore=False)
    assert plain.mask is None and torch.equal(plain.labels, target[:, :-1].float())


@pytest.mark.parametrize("ignore", [False, True])
def test_region_dice_and_bce_are_nnunets(ignore):
    raw, target = region_batch(ignore=ignore)
    theirs_loss = nnunet_loss(regions=True, ignore_label=R + 1 if ignore else None)
    encoded = encode_regions(target if ignore else target[:, :-1], has_ignore=ignore)
    nn_target = target if ignore else target[:, :-1]
    mask = encoded.mask
    ours, g_ours = value_and_grad(lambda x: soft_dice_loss(x, encoded.labels, mask=mask, multilabel=True), raw)
    mask_nn = None if mask is None else mask.bool()
    theirs, g_theirs = value_and_grad(lambda x: theirs_loss.dc(x, nn_target[:, :R], loss_mask=mask_nn), raw)
    assert ours.item() == pytest.approx(theirs.item() + 1, abs=1e-6)
    assert torch.allclose(g_ours, g_theirs, atol=1e-7)
    # BCE: nnU-Net's unmasked BCE is the element mean; under a mask it sums the R channels per voxel
    bce = cross_entropy_loss(raw, encoded.labels, mask, multilabel=True)
    total = theirs_loss(raw, nn_target)
    dice_theirs = theirs_loss.dc(raw, nn_target[:, :R], loss_mask=mask_nn)
    assert (total - dice_theirs).item() == pytest.approx(bce.item() * (R if ignore else 1), rel=1e-5)


def test_class_ce_and_dice_with_ignore_label_are_nnunets():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 3, 7, 6, generator=g)
    seg = torch.randint(0, 4, (2, 1, 7, 6), generator=g)  # 3 = ignore
    theirs_loss = nnunet_loss(regions=False, ignore_label=3)
    encoded = encode_labels(seg, 3, ignore_label=3)
    assert torch.equal(encoded.mask, (seg != 3).float()) and int(encoded.labels.max()) <= 2
    ours = soft_dice_loss(raw, encoded.labels, mask=encoded.mask) + cross_entropy_loss(raw, encoded.labels,
                                                                                       encoded.mask)
    assert ours.item() == pytest.approx(theirs_loss(raw, seg).item() + 1, abs=1e-5)


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize("parameterization", ["x1", "velocity"])
@pytest.mark.parametrize("t", [0.0, 0.6])
def test_labels_at_ignored_voxels_change_no_loss_and_no_gradient(regions, parameterization, t):
    """Two targets that differ only at ignored voxels: same x_t (the prior there), same flow MSE, Dice, CE/BCE
    and the same gradient w.r.t. the network output."""
    g = torch.Generator().manual_seed(2)
    spatial = (6, 5, 4)
    ignored = torch.rand(2, 1, *spatial, generator=g) < 0.5
    mask = (~ignored).float()
    if regions:
        a = torch.rand(2, R, *spatial, generator=g) > 0.5
        b = torch.where(ignored, torch.rand(2, R, *spatial, generator=g) > 0.2, a)  # other labels where ignored
        plain_a, plain_b = encode_regions(a), encode_regions(b)
    else:
        a = torch.randint(0, R, (2, 1, *spatial), generator=g)
        b = torch.where(ignored, (a + 1) % R, a)
        plain_a, plain_b = encode_labels(a, R), encode_labels(b, R)
    assert not torch.equal(plain_a.x1, plain_b.x1)
    enc_a, enc_b = (LabelTarget(p.x1, p.labels, mask) for p in (plain_a, plain_b))
    raw = torch.randn(2, R, *spatial, generator=g)
    x0 = torch.randn(2, R, *spatial, generator=g)
    tt = torch.full((2,), t)
    loss = FlowMatchingLoss(parameterization, multilabel=regions)
    results = []
    for enc in (enc_a, enc_b):
        path = LinearPath().sample(x0, prior_where_ignored(enc.x1, x0, enc.mask), tt)
        where = ignored.expand_as(x0)
        assert torch.allclose(path.x_t[where], x0[where], atol=1e-6)  # the prior there, at every t
        x = raw.clone().requires_grad_(True)
        out = loss(x, path, enc.labels, enc.mask)
        out["loss"].backward()
        results.append((out, x.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    for key in ("mse", "seg", "loss"):
        assert out_a[key].item() == pytest.approx(out_b[key].item(), abs=1e-6), key
    assert torch.allclose(grad_a, grad_b, atol=1e-8)
    assert grad_a[ignored.expand_as(grad_a)].abs().max() == 0  # no gradient at ignored voxels
    assert grad_a.abs().sum() > 0
    # without the mask, the same two targets do give different losses
    path_a, path_b = (LinearPath().sample(x0, enc.x1, tt) for enc in (enc_a, enc_b))
    assert abs(loss(raw, path_a, enc_a.labels)["loss"] - loss(raw, path_b, enc_b.labels)["loss"]) > 1e-3


def test_all_ignored_gives_zero_loss():
    raw = torch.randn(1, R, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    labels = torch.zeros(1, R, 4, 4)
    assert cross_entropy_loss(raw, labels, mask, multilabel=True).item() == 0
    assert soft_dice_loss(raw, labels, mask=mask, multilabel=True).item() == pytest.approx(0, abs=1e-6)
