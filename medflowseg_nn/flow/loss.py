"""Flow-matching objective and the network output parameterisations.

The network returns a raw tensor ``o`` of shape ``[B, C, *S]``. Two parameterisations turn it into a velocity
and a one-step estimate of the clean mask ``x̂1``:

* ``velocity``: v = o, x̂1 = x_t + (1 - t) v. Segmentation logits for Dice/CE: ``logit_scale * x̂1``.
* ``x1`` (clean mask): x̂1 = 2 softmax(o) - 1 ∈ [-1, 1], v = (x̂1 - x_t) / (1 - t). The logits for Dice/CE
  are ``o`` itself, so the Dice+CE term is nnU-Net's ``DC_and_CE_loss`` with batch Dice, up to +1.

Regions (``multilabel=True``, nnU-Net's region-based training; C = R overlapping binary channels): the ``x1``
parameterisation uses a sigmoid per channel, x̂1 = 2 sigmoid(o) - 1 (= tanh(o / 2)), and the segmentation term
is Dice over all R channels + BCE, nnU-Net's ``DC_and_BCE_loss`` with batch Dice, up to +1.

Ignore label (``mask [B, 1, *S]``, 0 at ignored voxels): every term — flow MSE, Dice, CE/BCE — is a mean over
the voxels that count only (Dice as nnU-Net's ``loss_mask``); ignored voxels contribute no gradient.

Loss = ``mse_weight`` · MSE + ``seg_weight`` · (``dice_weight`` · soft Dice + CE) on the one-step estimate; see
:class:`FlowMatchingLoss` for which MSE each parameterisation uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medflowseg_nn.flow.label_smoothing import spatially_smoothed
from medflowseg_nn.flow.path import PathSample, expand_time

PARAMETERIZATIONS = ("velocity", "x1")


@dataclass(frozen=True)
class FieldOutput:
    """What one network evaluation means. All tensors ``[B, C, *S]``."""

    velocity: Tensor
    x1_hat: Tensor
    logits: Tensor


def velocity_towards(x1: Tensor, x_t: Tensor, t: Tensor, min_remaining_time: float = 1e-3) -> Tensor:
    """``(x1 - x_t) / (1 - t)`` ``[B, C, *S]``: the straight-line velocity that reaches ``x1`` at t = 1 (``t``
    ``[B]``), the remaining time clamped at ``min_remaining_time`` (the field is singular at t = 1)."""
    return (x1 - x_t) / (1 - expand_time(t, x_t)).clamp_min(min_remaining_time)


def interpret_output(raw: Tensor, x_t: Tensor, t: Tensor, parameterization: str,
                     logit_scale: float = 5.0, min_remaining_time: float = 1e-3,
                     multilabel: bool = False) -> FieldOutput:
    """Turn the raw network output into velocity, clean-mask estimate and segmentation logits (softmax logits,
    or per-channel sigmoid logits when ``multilabel``)."""
    if parameterization == "velocity":
        tt = expand_time(t, x_t)
        x1_hat = x_t + (1 - tt) * raw
        return FieldOutput(velocity=raw, x1_hat=x1_hat, logits=logit_scale * x1_hat)
    if parameterization == "x1":
        probs = torch.sigmoid(raw.float()) if multilabel else torch.softmax(raw.float(), 1)
        x1_hat = 2 * probs.to(raw.dtype) - 1
        return FieldOutput(velocity=velocity_towards(x1_hat, x_t, t, min_remaining_time), x1_hat=x1_hat, logits=raw)
    raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def soft_dice_loss(logits: Tensor, seg: Tensor, smooth: float = 1e-5, ddp: bool = False,
                   mask: Optional[Tensor] = None, multilabel: bool = False) -> Tensor:
    """Batch soft Dice (nnU-Net's ``batch_dice`` style). ``logits [B, C, *S]``; ``seg``: ``[B, *S]`` long (classes:
    softmax, foreground classes averaged) or ``[B, C, *S]`` {0, 1} (``multilabel``: sigmoid, every region
    averaged, nnU-Net's ``do_bg=True`` for regions). ``mask [B, 1, *S]``: voxels with 0 are left out of every sum
    (nnU-Net's ``loss_mask``). ``ddp``: the sums run over the *global* batch of all ranks (autograd-aware
    all-reduce, as nnU-Net's ``MemoryEfficientSoftDiceLoss(ddp=True)`` gathers them), so DDP's gradient average
    equals the gradient of one process on the concatenated batch."""
    if multilabel:
        probs, one_hot = torch.sigmoid(logits.float()), seg.float()
    else:
        probs, one_hot = torch.softmax(logits.float(), 1), F.one_hot(seg, logits.shape[1]).movedim(-1, 1).float()
    if mask is not None:
        probs, one_hot = probs * mask, one_hot * mask
    axes = [0] + list(range(2, logits.ndim))
    intersect = (probs * one_hot).sum(axes)
    denom = probs.sum(axes) + one_hot.sum(axes)
    if ddp:
        from torch.distributed.nn.functional import all_reduce

        intersect, denom = all_reduce(intersect), all_reduce(denom)
    dice = (2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1 - dice[1:].mean() if logits.shape[1] > 1 and not multilabel else 1 - dice.mean()


def masked_mean(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values [B, C, *S]`` over the voxels where ``mask [B, 1, *S]`` is 1 (all voxels for ``None``);
    0 when no voxel counts."""
    if mask is None:
        return values.mean()
    weight = mask.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1e-8)


def cross_entropy_loss(logits: Tensor, seg: Tensor, mask: Optional[Tensor] = None,
                       multilabel: bool = False, smoothing_sigma: float = 0.0) -> Tensor:
    """CE (classes, ``seg [B, *S]`` long) or BCE with logits (``multilabel``, ``seg [B, C, *S]`` {0, 1}),
    averaged over the voxels that ``mask`` keeps. Without a mask these are nnU-Net's CE and BCE; with one, the
    CE is nnU-Net's ``ignore_index`` CE, and the BCE is nnU-Net's masked BCE divided by C (nnU-Net sums the C
    channels per voxel under a mask but averages them without one; here it is always the mean).
    ``smoothing_sigma`` > 0: the target is spatially smoothed (SVLS, :mod:`medflowseg_nn.flow.label_smoothing`)."""
    target = seg.float() if multilabel else seg  # class indices, or class probabilities once smoothed
    if smoothing_sigma > 0:
        one_hot = target if multilabel else F.one_hot(seg, logits.shape[1]).movedim(-1, 1).float()
        target = spatially_smoothed(one_hot, smoothing_sigma, mask)
    if multilabel:
        values = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    else:
        values = F.cross_entropy(logits.float(), target, reduction="none")[:, None]
    return masked_mean(values, mask)


class FlowMatchingLoss(nn.Module):
    """MSE on the flow plus Dice + CE (BCE for regions) on the one-step estimate.

    The MSE is taken on the velocity for the ``velocity`` parameterisation and on the clean-mask estimate for
    ``x1`` (velocity MSE weighted by (1 − t)², which stays finite as t → 1). ``multilabel``: the label space is
    R binary region channels (sigmoid), see the module docstring. ``smoothing_sigma`` > 0: the CE / BCE target
    is spatially smoothed (SVLS); the Dice term and the MSE keep the hard mask. ``dice_weight`` scales the soft
    Dice (0: CE + MSE, proper scores only; the Dice is then not computed).
    """

    def __init__(self, parameterization: str = "x1", mse_weight: float = 1.0, seg_weight: float = 1.0,
                 logit_scale: float = 5.0, ddp: bool = False, multilabel: bool = False,
                 smoothing_sigma: float = 0.0, dice_weight: float = 1.0):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        self.mse_weight = mse_weight
        self.seg_weight = seg_weight
        self.logit_scale = logit_scale
        self.ddp = ddp  #: batch Dice over the global batch of all ranks (see soft_dice_loss)
        self.multilabel = multilabel
        self.smoothing_sigma = smoothing_sigma  #: SVLS of the CE target (0 = the one-hot target)
        self.dice_weight = dice_weight  #: weight of the soft Dice beside the CE (0 = CE only)

    def forward(self, raw: Tensor, path: PathSample, seg: Tensor,
                mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``raw``: network output ``[B, C, *S]``; ``seg``: ``[B, 1, *S]`` or ``[B, *S]`` labels (classes) or
        ``[B, C, *S]`` {0, 1} regions (``multilabel``); ``mask``: ``[B, 1, *S]``, 0 at ignored voxels (or ``None``).
        Returns ``{'loss', 'mse', 'seg'}`` scalars."""
        if not self.multilabel:
            if seg.ndim == raw.ndim:
                seg = seg[:, 0]
            seg = seg.long().clamp_min(0)
        out = interpret_output(raw.float(), path.x_t.float(), path.t, self.parameterization, self.logit_scale,
                               multilabel=self.multilabel)
        if self.parameterization == "velocity":
            mse = masked_mean((out.velocity - path.velocity.float()) ** 2, mask)
        else:
            mse = masked_mean((out.x1_hat - path.x1.float()) ** 2, mask)
        zero = raw.new_zeros(())
        dice = (soft_dice_loss(out.logits, seg, ddp=self.ddp, mask=mask, multilabel=self.multilabel)
                if self.seg_weight > 0 and self.dice_weight > 0 else zero)
        seg_loss = (self.dice_weight * dice
                    + cross_entropy_loss(out.logits, seg, mask, self.multilabel, self.smoothing_sigma)
                    if self.seg_weight > 0 else zero)
        loss = self.mse_weight * mse + self.seg_weight * seg_loss
        return {"loss": loss, "mse": mse.detach(), "seg": seg_loss.detach()}
