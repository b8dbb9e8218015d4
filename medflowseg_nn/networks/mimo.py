"""Multi-input multi-output (MIMO) vector field: M subnetworks in the channels of one UNet (issue #9).

Havasi et al., "Training independent subnetworks for robust prediction" (ICLR 2021): a network whose input holds M
examples side by side in its channels and whose output holds M predictions learns M largely independent
subnetworks in one set of weights; at test time the same input is repeated M times and the M outputs are averaged —
an ensemble's calibration for about one network's cost. A fold ensemble's value over one model is model-level
diversity (``benchmarks/RESULTS.md`` 2026-12-05 curve: no change to the flow's objective or sampler gave one
model that); this is the cheapest way to build it into one model. Written here rather than taken from a library:
neither MONAI nor torchmetrics has a MIMO wrapper, and the flow's (image, x_t, t) signature needs its own one.

The inner network is any vector field built for ``M · C_img`` image and ``M · K`` x_t / output channels (member m
in channels ``m·C … (m+1)·C − 1``). :class:`MimoVectorField` keeps the vector field's signature:

* **training mode** — ``image`` ``[G·M, C, *S]``, ``x_t`` ``[G·M, K, *S]`` (or ``None``), ``t`` ``[G·M]``: rows
  ``g·M … g·M + M − 1`` are group g, one row per member, drawn at one t (every row of a group must have the same
  t: the time embedding is shared by the group). The group's rows go into one network row; the output (each
  deep-supervision output too) comes back as ``[G·M, K, *S']``, row r being member ``r mod M``'s prediction for
  input row r, so a loss sees an ordinary batch of G·M rows.
* **eval mode** — ``image`` ``[B, C, *S]``, ``x_t`` ``[N·B, K, *S]`` (N samples, sample-major, or ``None``),
  ``t`` ``[N·B]``: each input is repeated in every member's channels and the output is the members' mean
  probability written as logits, ``log(1/M Σ_m softmax(raw_m))`` ``[N·B, K, *S]`` (softmax of it is the mean). Only
  softmax outputs of the x1 parameterisation have this meaning (config and trainer refuse the rest).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from medflowseg_nn.inference.sample_average import average_log_probabilities

Output = Union[Tensor, list[Tensor]]


def members_to_channels(x: Tensor, members: int) -> Tensor:
    """``[G·M, C, *S]`` (groups of M consecutive rows) -> ``[G, M·C, *S]`` (member m in channels m·C …)."""
    if x.shape[0] % members:
        raise ValueError(f"a MIMO batch holds groups of {members} rows, got {x.shape[0]} rows")
    return x.reshape(x.shape[0] // members, members * x.shape[1], *x.shape[2:])


def channels_to_members(x: Tensor, members: int) -> Tensor:
    """The inverse of :func:`members_to_channels`: ``[G, M·K, *S]`` -> ``[G·M, K, *S]``."""
    return x.reshape(x.shape[0] * members, x.shape[1] // members, *x.shape[2:])


def mean_probability_logits(raw: Tensor, members: int) -> Tensor:
    """``raw`` ``[B, M·K, *S]`` softmax logits of M members -> ``[B, K, *S]`` logits of their mean probability,
    ``logsumexp_m log_softmax(raw_m) − log M`` (the K-sample average of ``inference.sample_average``; float32, then
    the input's dtype)."""
    per_member = raw.float().reshape(raw.shape[0], members, raw.shape[1] // members, *raw.shape[2:])
    return average_log_probabilities(torch.log_softmax(per_member, 2).movedim(1, 0)).to(raw.dtype)


class MimoVectorField(nn.Module):
    """M subnetworks of one vector field (module docstring). ``inner`` takes ``M·C`` image and ``M·K`` x_t
    channels; ``members`` = M ≥ 2."""

    #: ``forward`` takes ``x_t=None`` at t = 0 when the inner field does (the prior-free evaluation)
    accepts_prior_free = True
    #: in eval mode one image batch serves N samples' x_t (the inner field repeats it)
    shares_image_across_samples = True

    def __init__(self, inner: nn.Module, members: int):
        super().__init__()
        if members < 2:
            raise ValueError(f"a MIMO field needs at least 2 members, got {members}")
        if inner.input_channels % members or inner.num_classes % members:
            raise ValueError(f"the inner field's {inner.input_channels} image and {inner.num_classes} x_t channels "
                             f"are not {members} members' worth")
        self.inner, self.members = inner, members
        self.input_channels, self.num_classes = inner.input_channels // members, inner.num_classes // members

    @property
    def time_scaled_x_t(self) -> bool:
        return self.inner.time_scaled_x_t

    @property
    def has_deep_supervision_heads(self) -> bool:
        return self.inner.has_deep_supervision_heads

    def set_deep_supervision(self, enabled: bool) -> None:
        self.inner.set_deep_supervision(enabled)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]):
        return self.inner.compute_conv_feature_map_size(input_size)

    def forward(self, image: Tensor, x_t: Optional[Tensor], t: Tensor) -> Output:
        """See the module docstring (training: groups of M rows; eval: every member on the same input)."""
        m = self.members
        if self.training:
            if x_t is not None and x_t.shape[0] != image.shape[0]:
                raise ValueError("in training a MIMO field takes one x_t row per image row")
            group_t = t.reshape(-1, m)
            if not bool((group_t == group_t[:, :1]).all()):
                raise ValueError(f"the {m} rows of a MIMO group must share their t")
            raw = self.inner(members_to_channels(image, m),
                             None if x_t is None else members_to_channels(x_t, m), group_t[:, 0])
            return [channels_to_members(o, m) for o in raw] if isinstance(raw, (list, tuple)) \
                else channels_to_members(raw, m)
        raw = self.inner(image.repeat(1, m, *[1] * (image.ndim - 2)),
                         None if x_t is None else x_t.repeat(1, m, *[1] * (x_t.ndim - 2)), t)
        return mean_probability_logits(raw, m)
