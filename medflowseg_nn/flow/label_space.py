"""Mapping between integer segmentations and the continuous space the flow lives in.

A segmentation ``[B, 1, *S]`` (or ``[B, *S]``) with values in ``0..K-1`` becomes a one-hot tensor scaled to
``[-1, 1]``: ``x1 = 2 * one_hot - 1`` of shape ``[B, K, *S]``. Back: ``argmax`` over the channel axis, or
log-probabilities ``log((x + 1) / 2)`` (clamped and renormalised), which is what nnU-Net's sliding window
accumulates and later softmaxes for export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


def target_to_segmentation(x: Tensor) -> Tensor:
    """``[B, K, *S]`` → ``[B, *S]`` integer labels by argmax over classes."""
    return x.argmax(1)


def target_to_probabilities(x: Tensor, eps: float = 1e-4) -> Tensor:
    """``[B, K, *S]`` in about [-1, 1] → probabilities ``[B, K, *S]`` proportional to ``(x + 1) / 2``."""
    p = ((x.float() + 1) / 2).clamp_min(eps)
    return p / p.sum(1, keepdim=True)


def target_to_log_probabilities(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Log of :func:`target_to_probabilities`; softmax of the result gives the probabilities back."""
    return torch.log(target_to_probabilities(x, eps))
