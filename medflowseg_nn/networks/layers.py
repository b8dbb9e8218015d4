"""Small helpers shared by the network modules."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """Whether :func:`conv_with` and :class:`InferenceConv3d` call oneDNN directly: an inference-time (no autograd)
    float32 CPU 3D convolution of one image (``x [1, C, D, H, W]``), not grouped, with a kernel of more than one
    voxel.

    Why: PyTorch's CPU convolution sends a batch-1 convolution with a kernel of at most 3 per axis to its im2col
    path (``slow_conv3d``) when N·C·D·H ≤ 20480 (a rule written for 2D images; for larger inputs it calls the same
    oneDNN op as here). For the 3D shapes of a sliding-window tile oneDNN is faster (1 thread, Hippocampus
    40×56×40 tile, ``benchmarks/RESULTS.md`` 2026-12-04 and 2026-12-05): 1 → 32 channels 8.3 → 3.5 ms, 8 → 8 at full
    resolution 93 → 9 ms, 128 → 128 at 10×14×10 21 → 14 ms, 256 → 256 at 5×7×5 12 → 8 ms; for 1×1×1 kernels slower
    (0.57 → 0.69 ms), and depthwise kernels already take the same code. PyTorch has no switch for the rule."""
    return (x.ndim == 5 and x.shape[0] == 1 and groups == 1 and weight.shape[2:].numel() > 1
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


class InferenceConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters, state dict and training path) whose convolution goes to oneDNN for the
    :func:`prefers_onednn` inputs: batch-1 inference tiles on the CPU. Outputs equal ``nn.Conv3d``'s up to float
    rounding (~1e-6 relative)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":  # conv_with pads with zeros only
            return super()._conv_forward(input, weight, bias)
        return conv_with(self, input, weight, bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> "InferenceConv3d":
        """A new module with ``conv``'s settings that shares its weight and bias tensors."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new


def use_onednn_convs(module: nn.Module) -> nn.Module:
    """Replace, in place and recursively, every child of type exactly ``nn.Conv3d`` by an :class:`InferenceConv3d`
    sharing its parameters (names and state dict unchanged); returns ``module``. 2D modules are left alone."""
    for name, child in module.named_children():
        if type(child) is nn.Conv3d:
            setattr(module, name, InferenceConv3d.from_conv(child))
        else:
            use_onednn_convs(child)
    return module


def stage_indices(stages: Sequence[int], n_stages: int, name: str) -> list[int]:
    """``stages`` of an ``n_stages``-stage network as sorted indices, negative ones counted from the deepest
    (``[-2, -1]`` of 4 stages: ``[2, 3]``); a stage out of range or named twice raises ``ValueError``."""
    indices = sorted(s % n_stages for s in stages if -n_stages <= s < n_stages)
    if len(indices) != len(stages) or len(set(indices)) != len(indices):
        raise ValueError(f"{name} {list(stages)} must be distinct stages of {n_stages}")
    return indices
