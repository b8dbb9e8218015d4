"""Small helpers shared by the attention modules."""
from __future__ import annotations

from torch import nn


def num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` that is ``<= max_groups`` (GroupNorm group count)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def conv_ndim(conv_op: type[nn.Module]) -> int:
    """Spatial dimensionality of a conv op: 1, 2 or 3."""
    if issubclass(conv_op, nn.Conv3d):
        return 3
    if issubclass(conv_op, nn.Conv2d):
        return 2
    if issubclass(conv_op, nn.Conv1d):
        return 1
    raise ValueError(f"Unsupported conv_op {conv_op!r}; expected nn.Conv1d/2d/3d")
