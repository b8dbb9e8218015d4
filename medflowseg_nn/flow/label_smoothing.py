"""Spatially varying label smoothing (SVLS) of the cross-entropy target.

SVLS (Islam & Glocker, "Spatially Varying Label Smoothing", IPMI 2021) replaces the one-hot CE target by its
convolution with a small Gaussian kernel whose centre weight equals the sum of the others: a voxel whose
neighbours share its label keeps a one-hot target, a voxel on a boundary gets a soft one (at most half of its
weight moves to the neighbours' labels). A hard target pushes every boundary voxel to full confidence; a global
temperature can only soften the whole image, the interior as much as the boundary — which is where a fold
ensemble's members disagree, and what makes the ensemble better calibrated than one model.

Written here rather than taken from a library: neither nnU-Net nor torchmetrics has it (MONAI is not a
dependency and has no SVLS either); it is one fixed depthwise convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def svls_kernel(spatial_dims: int, sigma: float) -> Tensor:
    """The SVLS kernel ``[3] * spatial_dims``: Gaussian weights exp(−d² / 2σ²) of the neighbours, the centre set to
    their sum, normalised to 1 (so the centre always keeps weight 1/2)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"SVLS needs 2 or 3 spatial dims, got {spatial_dims}")
    if sigma <= 0:
        raise ValueError(f"SVLS sigma must be > 0, got {sigma}")
    axes = torch.meshgrid(*[torch.arange(-1.0, 2.0)] * spatial_dims, indexing="ij")
    squared = sum(a ** 2 for a in axes)
    kernel = torch.exp(-squared / (2 * sigma ** 2))
    centre = (1,) * spatial_dims
    kernel[centre] = 0.0
    kernel[centre] = kernel.sum()
    return kernel / kernel.sum()


def spatially_smoothed(target: Tensor, sigma: float, mask: Optional[Tensor] = None) -> Tensor:
    """SVLS of ``target [B, C, *S]`` (one-hot classes or {0, 1} region channels, any float), borders replicated.

    ``mask [B, 1, *S]`` (1 where a voxel counts, nnU-Net's ignore label): ignored voxels lend no label to their
    neighbours — each voxel's target is the kernel average over the neighbours that count (the voxel itself
    always counts where it is kept). Returns float32 ``[B, C, *S]``; each voxel's classes still sum to 1 when
    ``target``'s do."""
    spatial = target.ndim - 2
    kernel = svls_kernel(spatial, sigma).to(target.device)
    conv = F.conv2d if spatial == 2 else F.conv3d

    def smooth(x: Tensor) -> Tensor:
        channels = x.shape[1]
        weight = kernel.expand(channels, 1, *kernel.shape)
        return conv(F.pad(x, (1, 1) * spatial, mode="replicate"), weight, groups=channels)

    target = target.float()
    if mask is None:
        return smooth(target)
    mask = mask.float()
    weight = smooth(mask)
    return torch.where(weight > 0, smooth(target * mask) / weight.clamp_min(1e-8), target)
