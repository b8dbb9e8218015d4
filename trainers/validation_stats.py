"""The hard foreground counts behind nnU-Net's pseudo Dice, in the flow's label space (plain labels or regions)."""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

from medflowseg_nn.flow.label_space import LabelTarget


def hard_stats(logits: torch.Tensor, target: LabelTarget, regions: bool) -> np.ndarray:
    """``[3, K-1]`` foreground tp, fp, fn of the argmax of ``logits`` ``[B, K, *S]`` (``[3, R]``: ``sigmoid > 0.5``
    per region with ``regions``), ignored voxels left out: nnU-Net's ``validation_step`` rules and its
    ``get_tp_fp_fn_tn``."""
    if regions:
        predicted, reference = (torch.sigmoid(logits.float()) > 0.5).float(), target.labels
    else:
        predicted = torch.zeros_like(logits, dtype=torch.float32)
        predicted.scatter_(1, logits.argmax(1, keepdim=True), 1)
        reference = target.labels[:, None]
    axes = [0] + list(range(2, logits.ndim))
    tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, reference, axes=axes, mask=target.mask)
    return np.stack([v.detach().cpu().numpy()[0 if regions else 1:] for v in (tp, fp, fn)])
