"""The vector field with nnU-Net's residual encoder (``ResidualEncoderUNet``, the ResEnc M/L/XL presets).

Built from the architecture keywords nnU-Net's ``ResEncUNetPlanner`` writes (``n_blocks_per_stage`` instead of
``n_conv_per_stage``). The encoder is dynamic-network-architectures' ``ResidualEncoder`` layout: a one-conv stem
at full resolution, then per stage ``StackedResidualBlocks`` of ``BasicBlockD`` (the first block strided), with
the last norm of every residual branch zero-initialised (``init_last_bn_before_add_to_0``), as in
``ResidualEncoderUNet.initialize``. Decoder, time modulation, the conditioning encoder, DBSA and FAA are those
of :class:`~medflowseg_nn.networks.vector_field_unet.VectorFieldUNet`, unchanged.

Inputs and outputs as ``VectorFieldUNet``: ``image [B, C_img, *S]``, ``x_t [B, K, *S]``, ``t [B]`` ->
``[B, K, *S]`` (or the deep-supervision list).
"""
from __future__ import annotations

from typing import Optional, Sequence, Type

import numpy as np
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import init_last_bn_before_add_to_0
from torch import Tensor, nn

from medflowseg_nn.networks.vector_field_unet import IntOrSeq, VectorFieldUNet


class StemAndResidualStage(nn.Module):
    """The first encoder stage: ``ResidualEncoder``'s stem (one conv block, stride 1) then the stage's residual
    blocks. ``[B, C_in, *S]`` -> ``[B, C_out, *S / stride]``."""

    def __init__(self, stem: StackedConvBlocks, stage: StackedResidualBlocks):
        super().__init__()
        self.stem, self.stage = stem, stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(self.stem(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        return np.int64(self.stem.compute_conv_feature_map_size(input_size)) + \
            np.int64(self.stage.compute_conv_feature_map_size(input_size))


class ResidualEncoderVectorFieldUNet(VectorFieldUNet):
    """:class:`VectorFieldUNet` whose encoder stages are residual (``BasicBlockD``); ``n_blocks_per_stage`` is
    nnU-Net's ResEnc keyword (e.g. ``(1, 3, 4, 6, 6, 6)``). Every other argument as ``VectorFieldUNet``."""

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage: IntOrSeq,
                 conv_op: Type[nn.Module], kernel_sizes: Sequence, strides: Sequence, n_blocks_per_stage: IntOrSeq,
                 n_conv_per_stage_decoder: IntOrSeq, conv_bias: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, **flow_kwargs):
        super().__init__(input_channels, num_classes, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_blocks_per_stage, n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs,
                         dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, deep_supervision, **flow_kwargs)
        self.encoder.apply(init_last_bn_before_add_to_0)

    def first_stage_parts(self) -> tuple[nn.Module, list[nn.Module]]:
        """(the stem's first conv block, which sees ``image ⊕ x_t``; the rest of the stem, the residual blocks)."""
        stage = self.encoder[0]
        return stage.stem.convs[0], [stage.stem.convs[1:], stage.stage]

    @staticmethod
    def build_encoder_stage(stage: int, n_blocks: int, conv_op: Type[nn.Module], input_channels: int,
                            output_channels: int, kernel_size: IntOrSeq, stride: IntOrSeq, block: dict) -> nn.Module:
        """``n_blocks`` ``BasicBlockD`` residual blocks (the first with ``stride``); stage 0 starts with the stem."""
        if stage == 0:
            stem = StackedConvBlocks(1, conv_op, input_channels, output_channels, kernel_size, 1, **block)
            return StemAndResidualStage(stem, StackedResidualBlocks(n_blocks, conv_op, output_channels,
                                                                    output_channels, kernel_size, stride,
                                                                    block=BasicBlockD, **block))
        return StackedResidualBlocks(n_blocks, conv_op, input_channels, output_channels, kernel_size, stride,
                                     block=BasicBlockD, **block)
