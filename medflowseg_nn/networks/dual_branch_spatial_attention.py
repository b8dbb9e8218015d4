"""Dual-Branch Spatial Attention (DBSA) block for MedFlowSeg.

The block injects image (conditioning-encoder) features into the flow-matching
decoder features at one resolution level.  It is pure PyTorch (no nnU-Net import)
and works for 2D and 3D via ``conv_op`` (``nn.Conv2d`` or ``nn.Conv3d``).

Shapes (``*S`` = spatial dims, 2 or 3 of them, any size incl. odd):

* ``x``    : ``[B, C, *S]``  flow (velocity-decoder) features
* ``cond`` : ``[B, Cc, *S]`` image features, same spatial size as ``x``
* ``temb`` : ``[B, time_dim]`` optional time embedding
* output   : ``[B, C, *S]``

Design:

1. Input fusion: ``h = act(norm(conv1x1(cat(x, cond))))`` with ``C`` channels.
2. Local branch: for every dilation ``d`` a depthwise-separable dilated conv
   (depthwise 3^n kernel with dilation ``d`` -> pointwise 1x1 -> norm -> act);
   the branches are averaged -> multi-scale local context ``[B, C, *S]``.
3. Global branch: channel attention from globally pooled context
   (GAP -> 1x1 -> act -> 1x1 -> sigmoid, ``[B, C, 1...]``) and a spatial
   attention map from low-frequency structure: ``h`` is average-pooled by x2 and
   x4 (adaptive pooling, ceil sizes, so odd sizes work), a 3^n conv maps each to
   one channel, the maps are interpolated back to exactly ``*S``, summed and
   passed through a sigmoid (``[B, 1, *S]``).  ``global = h * ca * sa``.
4. ``fused = local + global``; if ``time_dim`` is given, a time-dependent
   scale/shift (``Linear(time_dim, 2C)``) is applied: ``fused*(1+scale)+shift``.
5. A ZERO-initialised 1x1 conv projects ``fused``; the block returns
   ``x + proj(fused)`` so the untrained block is exactly the identity.

Normalisation is GroupNorm (with one channel per group for small ``C`` this is
instance norm, as in nnU-Net) and is never applied to pooled maps, so 1x1
spatial maps are safe.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medflowseg_nn.networks.layers import conv_ndim, num_groups


__all__ = ["DualBranchSpatialAttention"]

class DualBranchSpatialAttention(nn.Module):
    """Fuse image features into flow features with local and global attention branches.

    Args:
        channels: number of flow-feature channels ``C`` (also output channels).
        cond_channels: number of conditioning (image) feature channels ``Cc``.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        time_dim: size of the time embedding; ``None`` disables time modulation.
        dilations: dilation rates of the local multi-scale depthwise-separable convs.
    """

    pool_scales: tuple[int, ...] = (2, 4)

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        conv_op: type[nn.Module],
        time_dim: int | None = None,
        dilations: tuple[int, ...] = (1, 2, 3),
    ) -> None:
        super().__init__()
        if channels < 1 or cond_channels < 1:
            raise ValueError("channels and cond_channels must be positive")
        if len(dilations) == 0:
            raise ValueError("at least one dilation is required")
        self.channels = channels
        self.cond_channels = cond_channels
        self.conv_op = conv_op
        self.ndim = conv_ndim(conv_op)
        self.time_dim = time_dim
        self.dilations = tuple(int(d) for d in dilations)
        groups = num_groups(channels)

        def act() -> nn.Module:
            return nn.LeakyReLU(0.01, inplace=False)

        # 1. input fusion of flow + image features
        self.fuse_in = nn.Sequential(
            conv_op(channels + cond_channels, channels, kernel_size=1),
            nn.GroupNorm(groups, channels),
            act(),
        )
        # 2. local branch: depthwise-separable dilated convs
        self.local_branches = nn.ModuleList(
            nn.Sequential(
                conv_op(channels, channels, kernel_size=3, padding=d, dilation=d, groups=channels, bias=False),
                conv_op(channels, channels, kernel_size=1),
                nn.GroupNorm(groups, channels),
                act(),
            )
            for d in self.dilations
        )
        # 3a. global branch: channel attention from pooled context
        hidden = max(channels // 4, 4)
        self.channel_mlp = nn.Sequential(
            conv_op(channels, hidden, kernel_size=1),
            act(),
            conv_op(hidden, channels, kernel_size=1),
        )
        # 3b. global branch: spatial attention from low-frequency (downsampled) structure
        self.spatial_convs = nn.ModuleList(
            conv_op(channels, 1, kernel_size=3, padding=1) for _ in self.pool_scales
        )
        # 4. optional time modulation
        self.time_mod = nn.Linear(time_dim, 2 * channels) if time_dim is not None else None
        # 5. zero-initialised output projection -> identity at init
        self.proj = conv_op(channels, channels, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    # ------------------------------------------------------------------ helpers
    def _pool(self, h: Tensor, scale: int) -> Tensor:
        size = [max(1, math.ceil(s / scale)) for s in h.shape[2:]]
        if self.ndim == 3:
            return F.adaptive_avg_pool3d(h, size)
        if self.ndim == 2:
            return F.adaptive_avg_pool2d(h, size)
        return F.adaptive_avg_pool1d(h, size)

    def _interp_mode(self) -> str:
        return {1: "linear", 2: "bilinear", 3: "trilinear"}[self.ndim]

    def spatial_attention(self, h: Tensor) -> Tensor:
        """Multi-scale low-frequency spatial attention map ``[B, 1, *S]`` in (0, 1)."""
        size = h.shape[2:]
        logits = None
        for scale, conv in zip(self.pool_scales, self.spatial_convs):
            m = conv(self._pool(h, scale))
            m = F.interpolate(m, size=size, mode=self._interp_mode(), align_corners=False)
            logits = m if logits is None else logits + m
        assert logits is not None
        return torch.sigmoid(logits)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, cond: Tensor, temb: Tensor | None = None) -> Tensor:
        """``x`` [B, C, *S], ``cond`` [B, Cc, *S], ``temb`` [B, time_dim] -> [B, C, *S]."""
        if x.shape[2:] != cond.shape[2:]:
            raise ValueError(f"spatial shapes differ: x {tuple(x.shape)} vs cond {tuple(cond.shape)}")
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected {self.ndim + 2}D input for {self.conv_op.__name__}, got {x.ndim}D")
        h = self.fuse_in(torch.cat([x, cond.to(x.dtype)], dim=1))

        local = self.local_branches[0](h)
        for branch in self.local_branches[1:]:
            local = local + branch(h)
        local = local / len(self.local_branches)

        pooled = h.mean(dim=tuple(range(2, h.ndim)), keepdim=True)
        ca = torch.sigmoid(self.channel_mlp(pooled))
        sa = self.spatial_attention(h)
        glob = h * ca * sa

        fused = local + glob
        if self.time_mod is not None:
            if temb is None:
                raise ValueError("this block was built with time_dim, so temb is required")
            ss = self.time_mod(temb).to(fused.dtype)
            ss = ss.view(ss.shape[0], ss.shape[1], *([1] * self.ndim))
            scale, shift = ss.chunk(2, dim=1)
            fused = fused * (1 + scale) + shift
        return x + self.proj(fused)

    # ------------------------------------------------------------------ planning
    def compute_conv_feature_map_size(self, spatial_shape: Sequence[int]) -> int:
        """Approximate activation elements stored for backward at batch size 1."""
        spatial_shape = [int(s) for s in spatial_shape]
        n = math.prod(spatial_shape)
        c, cc = self.channels, self.cond_channels
        total = (c + cc) * n  # concatenated input
        total += 3 * c * n  # fuse conv, norm, act
        total += len(self.dilations) * 4 * c * n  # dw conv, pw conv, norm, act per dilation
        total += c * n  # local average
        total += 2 * c + 2 * max(c // 4, 4)  # pooled context + channel MLP (tiny)
        for scale in self.pool_scales:
            ns = math.prod(max(1, math.ceil(s / scale)) for s in spatial_shape)
            total += c * ns + ns  # pooled map + 1-channel conv output
            total += n  # upsampled logits
        total += n  # sigmoid map
        total += 2 * c * n  # h * ca, * sa
        total += c * n  # local + global
        if self.time_mod is not None:
            total += 2 * c * n  # scale and shift
        total += 2 * c * n  # projection output, residual sum
        return int(total)
