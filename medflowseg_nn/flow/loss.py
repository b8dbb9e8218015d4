"""Flow-matching objective and the network output parameterisations.

The network returns a raw tensor ``o`` of shape ``[B, K, *S]``. Two parameterisations turn it into a velocity
and a one-step estimate of the clean mask ``x̂1``:

* ``velocity``: v = o, x̂1 = x_t + (1 - t) v. Segmentation logits for Dice/CE: ``logit_scale * x̂1``.
* ``x1`` (clean mask): x̂1 = 2 softmax(o) - 1 ∈ [-1, 1], v = (x̂1 - x_t) / (1 - t). The logits for Dice/CE
  are ``o`` itself, so the Dice+CE term is nnU-Net's ``DC_and_CE_loss`` with batch Dice, up to +1.

Loss = ``mse_weight`` · MSE + ``seg_weight`` · (soft Dice + CE) on the one-step estimate; see
:class:`FlowMatchingLoss` for which MSE each parameterisation uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medflowseg_nn.flow.path import PathSample, expand_time

PARAMETERIZATIONS = ("velocity", "x1")


@dataclass(frozen=True)
class FieldOutput:
    """What one network evaluation means. All tensors ``[B, K, *S]``."""

    velocity: Tensor
    x1_hat: Tensor
    logits: Tensor


def interpret_output(raw: Tensor, x_t: Tensor, t: Tensor, parameterization: str,
                     logit_scale: float = 5.0, min_remaining_time: float = 1e-3) -> FieldOutput:
    """Turn the raw network output into velocity, clean-mask estimate and segmentation logits."""
    tt = expand_time(t, x_t)
    remaining = (1 - tt).clamp_min(min_remaining_time)
    if parameterization == "velocity":
        x1_hat = x_t + (1 - tt) * raw
        return FieldOutput(velocity=raw, x1_hat=x1_hat, logits=logit_scale * x1_hat)
    if parameterization == "x1":
        x1_hat = 2 * torch.softmax(raw.float(), 1).to(raw.dtype) - 1
        return FieldOutput(velocity=(x1_hat - x_t) / remaining, x1_hat=x1_hat, logits=raw)
    raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def soft_dice_loss(logits: Tensor, seg: Tensor, smooth: float = 1e-5, ddp: bool = False) -> Tensor:
    """Batch soft Dice over foreground classes (nnU-Net's ``batch_dice`` style). ``logits [B, K, *S]``, ``seg``:
    ``[B, *S]`` long. ``ddp``: the sums run over the *global* batch of all ranks (autograd-aware all-reduce, as
    nnU-Net's ``MemoryEfficientSoftDiceLoss(ddp=True)`` gathers them), so DDP's gradient average equals the
    gradient of one process on the concatenated batch."""
    probs = torch.softmax(logits.float(), 1)
    one_hot = F.one_hot(seg, logits.shape[1]).movedim(-1, 1).float()
    axes = [0] + list(range(2, logits.ndim))
    intersect = (probs * one_hot).sum(axes)
    denom = probs.sum(axes) + one_hot.sum(axes)
    if ddp:
        from torch.distributed.nn.functional import all_reduce

        intersect, denom = all_reduce(intersect), all_reduce(denom)
    dice = (2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1 - dice[1:].mean() if logits.shape[1] > 1 else 1 - dice.mean()


class FlowMatchingLoss(nn.Module):
    """MSE on the flow plus Dice + CE on the one-step estimate.

    The MSE is taken on the velocity for the ``velocity`` parameterisation and on the clean-mask estimate for
    ``x1`` (velocity MSE weighted by (1 − t)², which stays finite as t → 1).
    """

    def __init__(self, parameterization: str = "x1", mse_weight: float = 1.0, seg_weight: float = 1.0,
                 logit_scale: float = 5.0, ddp: bool = False):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        self.mse_weight = mse_weight
        self.seg_weight = seg_weight
        self.logit_scale = logit_scale
        self.ddp = ddp  #: batch Dice over the global batch of all ranks (see soft_dice_loss)

    def forward(self, raw: Tensor, path: PathSample, seg: Tensor) -> dict[str, Tensor]:
        """``raw``: network output ``[B, K, *S]``; ``seg``: ``[B, 1, *S]`` or ``[B, *S]`` labels.
        Returns ``{'loss', 'mse', 'seg'}`` scalars."""
        if seg.ndim == raw.ndim:
            seg = seg[:, 0]
        seg = seg.long().clamp_min(0)
        out = interpret_output(raw.float(), path.x_t.float(), path.t, self.parameterization, self.logit_scale)
        if self.parameterization == "velocity":
            mse = F.mse_loss(out.velocity, path.velocity.float())
        else:
            mse = F.mse_loss(out.x1_hat, path.x1.float())
        zero = raw.new_zeros(())
        seg_loss = (soft_dice_loss(out.logits, seg, ddp=self.ddp) + F.cross_entropy(out.logits.float(), seg)) \
            if self.seg_weight > 0 else zero
        loss = self.mse_weight * mse + self.seg_weight * seg_loss
        return {"loss": loss, "mse": mse.detach(), "seg": seg_loss.detach()}
