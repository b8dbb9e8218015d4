"""Small helpers shared by the network modules."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: PyTorch's CPU convolution sends a batch-1 3D convolution with few input channels (N·C·D·H ≤ 20480, a rule
#: written for 2D images) to its im2col path ``slow_conv3d``; for the first conv of a sliding-window tile oneDNN is
#: several times faster (Hippocampus 40×56×40, 1 → 32 channels, 1 thread: 8.3 → 3.5 ms; see benchmarks/RESULTS.md)
ONEDNN_MAX_INPUT_CHANNELS = 8


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


def prefers_onednn(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether :func:`conv_with` calls oneDNN directly: an inference-time (no autograd) float32 CPU 3D convolution
    of one image with at most :data:`ONEDNN_MAX_INPUT_CHANNELS` input channels, where PyTorch would pick its
    slower im2col path (see :data:`ONEDNN_MAX_INPUT_CHANNELS`)."""
    return (x.ndim == 5 and x.shape[0] == 1 and x.shape[1] <= ONEDNN_MAX_INPUT_CHANNELS and groups == 1
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def conv_with(conv: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``conv``'s convolution (stride, padding, dilation, groups; zero padding) with another weight and bias.
    Same result as ``conv``'s own op up to float rounding (oneDNN for :func:`prefers_onednn` inputs; ~1e-6
    relative)."""
    if prefers_onednn(x, weight, conv.groups) and not isinstance(conv.padding, str):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(conv.padding),
                                                 list(conv.stride), list(conv.dilation), conv.groups)
    op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.ndim]
    return op(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
