"""Mapping between segmentations and the continuous space the flow lives in.

Two label spaces (no nnU-Net import here: the trainer says which one with ``multilabel``):

* **classes** (softmax, the default): integer labels ``[B, 1, *S]`` (or ``[B, *S]``) in ``0..K-1`` become a
  one-hot tensor scaled to ``[-1, 1]``: ``x1 = 2 * one_hot - 1`` of shape ``[B, K, *S]``. Back: ``argmax``, or
  log-probabilities ``log((x + 1) / 2)`` (clamped and renormalised), which nnU-Net's sliding window accumulates
  and later softmaxes for export.
* **regions** (``multilabel=True``, nnU-Net's region-based training): R overlapping binary channels
  ``[B, R, *S]`` (what nnU-Net's ``ConvertSegmentationToRegionsTransform`` delivers), ``x1 = 2 * r - 1``. Back:
  ``> 0`` per channel, or per-channel log-odds ``logit((x + 1) / 2)``, which nnU-Net's export turns into
  probabilities with a sigmoid (``label_manager.apply_inference_nonlin``) and into labels with
  ``regions_class_order``.

**Ignore label** (``mask``, ``[B, 1, *S]``, 1 where the voxel counts): at ignored voxels the target is replaced
by the prior draw, ``x1 := x0`` (:func:`prior_where_ignored`), so ``x_t = x0`` for every t there — the network
never sees label information at an ignored voxel, as at t = 0 — and the losses skip them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LabelTarget:
    """A batch's target in the flow's label space.

    Attributes:
        x1: ``[B, C, *S]`` in {-1, 1} (C = classes or regions); at ignored voxels it still holds background
            (classes) or 0-regions; :func:`prior_where_ignored` replaces them.
        labels: what Dice and CE/BCE compare with: ``[B, *S]`` long (classes; ignored voxels set to 0) or
            ``[B, R, *S]`` float in {0, 1} (regions).
        mask: ``[B, 1, *S]`` float, 1 where the voxel counts; ``None`` without an ignore label.
    """

    x1: Tensor
    labels: Tensor
    mask: Optional[Tensor] = None


def segmentation_to_target(seg: Tensor, num_classes: int) -> Tensor:
    """``[B, 1, *S]`` or ``[B, *S]`` integer labels → ``[B, K, *S]`` float target in {-1, 1}.

    Negative labels (nnU-Net marks voxels outside the image as -1 in some setups) are mapped to background.
    """
    if seg.ndim >= 3 and seg.shape[1] == 1:
        seg = seg[:, 0]
    seg = seg.long().clamp_min(0)
    if int(seg.max()) >= num_classes:
        raise ValueError(f"segmentation has label {int(seg.max())} but only {num_classes} classes are configured")
    one_hot = F.one_hot(seg, num_classes).movedim(-1, 1).float()
    return one_hot * 2 - 1


def encode_labels(seg: Tensor, num_classes: int, ignore_label: Optional[int] = None) -> LabelTarget:
    """Integer labels ``[B, 1, *S]`` (or ``[B, *S]``) → :class:`LabelTarget` for the class label space. Voxels
    equal to ``ignore_label`` are masked out (and set to background in ``labels`` and ``x1``), as nnU-Net's
    ``DC_and_CE_loss(ignore_label=...)`` and its ``validation_step`` do."""
    if seg.ndim >= 3 and seg.shape[1] == 1:
        seg = seg[:, 0]
    seg = seg.long().clamp_min(0)
    mask = None
    if ignore_label is not None:
        keep = seg != ignore_label
        seg = torch.where(keep, seg, torch.zeros_like(seg))
        mask = keep[:, None].float()
    return LabelTarget(segmentation_to_target(seg, num_classes), seg, mask)


def encode_regions(target: Tensor, has_ignore: bool = False) -> LabelTarget:
    """nnU-Net's region target ``[B, R (+1), *S]`` (bool or {0, 1}) → :class:`LabelTarget` for the region label
    space. With ``has_ignore`` the last channel marks the ignored voxels (nnU-Net appends the ignore label as an
    extra region; ``DC_and_BCE_loss(use_ignore_label=True)`` reads it the same way)."""
    target = target.float()
    mask = None
    if has_ignore:
        mask, target = 1 - target[:, -1:], target[:, :-1]
        target = target * mask  # an ignored voxel is in no region
    return LabelTarget(target * 2 - 1, target, mask)


def prior_where_ignored(x1: Tensor, x0: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``x1`` with the prior draw ``x0`` at ignored voxels (``mask`` ``[B, 1, *S]`` is 0 there): the path then
    stays at ``x_t = x0`` there for every t. ``mask=None`` returns ``x1``."""
    if mask is None:
        return x1
    return torch.where(mask.bool(), x1, x0)


def target_to_segmentation(x: Tensor, multilabel: bool = False) -> Tensor:
    """``[B, K, *S]`` → ``[B, *S]`` integer labels by argmax over classes, or (``multilabel``) ``[B, R, *S]``
    {0, 1} region masks (``x > 0``)."""
    return (x > 0).long() if multilabel else x.argmax(1)


def target_to_probabilities(x: Tensor, eps: float = 1e-4, multilabel: bool = False) -> Tensor:
    """``[B, K, *S]`` in about [-1, 1] → probabilities ``[B, K, *S]`` proportional to ``(x + 1) / 2`` (summing to
    1 over K), or (``multilabel``) ``(x + 1) / 2`` per channel clamped to ``[eps, 1 - eps]``."""
    p = (x.float() + 1) / 2
    if multilabel:
        return p.clamp(eps, 1 - eps)
    p = p.clamp_min(eps)
    return p / p.sum(1, keepdim=True)


def target_to_log_probabilities(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Log of :func:`target_to_probabilities` (classes); softmax of the result gives the probabilities back."""
    return torch.log(target_to_probabilities(x, eps))


def target_to_logits(x: Tensor, eps: float = 1e-4, multilabel: bool = False) -> Tensor:
    """What nnU-Net's export expects for ``x`` ``[B, K, *S]``: log-probabilities (classes; softmax inverts them)
    or per-channel log-odds (regions; sigmoid inverts them)."""
    if not multilabel:
        return target_to_log_probabilities(x, eps)
    p = target_to_probabilities(x, eps, multilabel=True)
    return torch.log(p) - torch.log1p(-p)


def draw_target(x: Tensor, uniform: Tensor, multilabel: bool = False) -> Tensor:
    """A segmentation drawn from the soft estimate ``x`` ``[B, K, *S]`` (about [-1, 1]), in the flow's label space
    ({-1, 1}, ``x``'s shape and dtype). Classes: per voxel the first class whose cumulative probability
    (:func:`target_to_probabilities`) exceeds ``uniform``; regions: each channel where its probability exceeds
    ``uniform``. ``uniform`` ``[B, 1, *S]`` in [0, 1), or broadcastable to it: one value per voxel draws every voxel
    independently (probability p of each class), one value per patch ``[B, 1, 1, ...]`` draws a level set of
    the probability map (the same quantile everywhere, spatially coherent)."""
    p = target_to_probabilities(x, multilabel=multilabel)
    u = uniform.to(p.dtype)
    if multilabel:
        return torch.where(p > u, 1.0, -1.0).to(x.dtype)
    labels = (p.cumsum(1) <= u).sum(1).clamp_max(p.shape[1] - 1)
    return (2 * F.one_hot(labels, p.shape[1]).movedim(-1, 1) - 1).to(x.dtype)
