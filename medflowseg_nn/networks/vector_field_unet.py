"""The MedFlowSeg vector field: a time-conditioned UNet v(x_t, t | image).

Built from the same architecture keywords nnU-Net's planner writes for ``PlainConvUNet`` (stages, features,
kernel sizes, strides, conv/norm/nonlin ops; ``conv_op`` decides 2D or 3D), so a plans file drives it directly.

Inputs: ``image`` ``[B, C_img, *S]``, ``x_t`` ``[B, K, *S]``, ``t`` ``[B]``; output ``[B, K, *S]`` (raw: its
meaning, velocity or clean-mask logits, is set by :mod:`medflowseg_nn.flow.loss`).

Deep supervision (``deep_supervision=True``): a 1x1 conv head after every decoder stage, as in
dynamic_network_architectures' ``UNetDecoder``. In training mode, while :attr:`VectorFieldUNet.deep_supervision`
is on, the forward returns the list of the decoder's outputs, highest resolution first (see ``forward``); in
eval mode, or with the flag switched off, the single full-resolution output, computed exactly as without the
option. The heads stay in the module either way, so a state dict trained with them loads strictly into a
network built from the same plans for inference.

Dual conditioning: the image enters as input channels (image ⊕ x_t) and, through a light conditioning
encoder, as features injected into skip connections by Dual-Branch Spatial Attention (DBSA; by default the
deepest skip, any set of skips from the plans).
Frequency-Aware Attention (FAA) refines the low-resolution encoder stages and the bottleneck. Every stage is
modulated by the time embedding. ``dbsa_stages=[]`` / ``faa_stages=[]`` switch the modules off (ablation).

Split first convolution: the first conv over ``image ⊕ x_t`` is linear in its input, so it equals
``conv_image(image) + conv_x_t(x_t)``. :meth:`VectorFieldUNet.x_t_projection` computes the x_t part alone; a
sampler whose x_t is the same seeded prior for every patch of a shape (one Euler step from t = 0) computes it
once and passes it to ``forward``, which then convolves only the image channels (on CPU oneDNN a 1-channel 3D conv
is ~5x cheaper than the 4-channel one of a 3-class model). Same result up to float rounding (two sums instead of
one; ~1e-6 relative).

Time-scaled x_t input (``time_scaled_x_t=True``; off for this class, on in new plans): the network sees
``t · x_t``. At t = 0 x_t is pure prior noise that carries nothing about x1, yet in the plain input it fills K of
the first convolution's ``C_img + K`` channels, which the network has to learn to ignore; scaled, the t = 0
evaluation (the one-step prediction) sees the image alone — nnU-Net's input — and its output no longer depends on
the prior draw, while at t > 0 the input keeps its signal-to-noise ratio (t is known from the time embedding).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp, maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn

from medflowseg_nn.networks.dual_branch_spatial_attention import DualBranchSpatialAttention
from medflowseg_nn.networks.frequency_aware_attention import FrequencyAwareAttention
from medflowseg_nn.networks.layers import conv_with, stage_indices, use_onednn_convs
from medflowseg_nn.networks.time_embedding import TimeEmbedding, TimeModulation

logger = logging.getLogger(__name__)
IntOrSeq = Union[int, Sequence[int]]


def default_faa_stages(n_stages: int) -> list[int]:
    """FAA at the two lowest-resolution encoder stages (the last one is the bottleneck)."""
    return list(range(max(0, n_stages - 2), n_stages))


def default_dbsa_stages(n_stages: int) -> list[int]:
    """DBSA on the deepest skip connection (the lowest resolution the decoder receives a skip at).

    Measured on CPU (1 thread, Hippocampus plans, ``benchmarks/RESULTS.md`` 2026-12-01): DBSA's depthwise
    (dilated) convolutions have slow CPU kernels, most of all in backward; on every skip below full resolution a
    2d training step cost 1.48x nnU-Net's, on the deepest skip only 1.28x (3d_fullres 1.23x -> 1.13x). List more
    stages in the plans' ``flow_matching.network.dbsa_stages`` to condition more skips (e.g. ``[1, 2]``).
    """
    return [n_stages - 2] if n_stages > 1 else []


def repeat_batch(x: Tensor, times: int) -> Tensor:
    """``[B, ...]`` -> ``[times·B, ...]``, the batch repeated sample-major (``x`` itself for ``times == 1``)."""
    return x if times == 1 else x.repeat(times, *([1] * (x.ndim - 1)))


def per_stage(v: IntOrSeq, n: int) -> list:
    """An architecture keyword as one value per stage: a list / tuple as a list, a scalar repeated ``n`` times."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


class VectorFieldUNet(nn.Module):
    #: ``forward`` accepts one image batch for N samples' x_t (see there): samplers need not repeat the image
    shares_image_across_samples = True
    #: ``forward`` takes ``x_t=None`` at t = 0 when ``time_scaled_x_t`` (the prior-free evaluation, see there)
    accepts_prior_free = True

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage: IntOrSeq,
                 conv_op: Type[nn.Module], kernel_sizes: Sequence, strides: Sequence, n_conv_per_stage: IntOrSeq,
                 n_conv_per_stage_decoder: IntOrSeq, conv_bias: bool = False,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, time_embed_dim: int = 128, cond_features_divisor: int = 4,
                 dbsa_stages: Optional[Sequence[int]] = None, faa_stages: Optional[Sequence[int]] = None,
                 faa_num_bands: int = 8, dbsa_dilations: Sequence[int] = (1, 2), time_scaled_x_t: bool = False,
                 dropout_stages: Optional[Sequence[int]] = None):
        super().__init__()
        #: the network sees ``t · x_t`` instead of x_t (see the module docstring)
        self.time_scaled_x_t = bool(time_scaled_x_t)
        features = per_stage(features_per_stage, n_stages)
        kernel_sizes, strides = per_stage(kernel_sizes, n_stages), per_stage(strides, n_stages)
        n_conv_enc = per_stage(n_conv_per_stage, n_stages)
        n_conv_dec = per_stage(n_conv_per_stage_decoder, n_stages - 1)
        self.input_channels, self.num_classes, self.n_stages = input_channels, num_classes, n_stages
        self.strides = [tuple(maybe_convert_scalar_to_list(conv_op, s)) for s in strides]
        self.features = features
        self.dbsa_stages = sorted(default_dbsa_stages(n_stages) if dbsa_stages is None else dbsa_stages)
        self.faa_stages = sorted(default_faa_stages(n_stages) if faa_stages is None else faa_stages)
        if any(not 0 <= s < n_stages - 1 for s in self.dbsa_stages):
            raise ValueError(f"dbsa_stages {self.dbsa_stages} must index skip connections 0..{n_stages - 2}")
        if any(not 0 <= s < n_stages for s in self.faa_stages):
            raise ValueError(f"faa_stages {self.faa_stages} must index stages 0..{n_stages - 1}")
        block = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                     dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        #: stages whose blocks (encoder, conditioning encoder, decoder) get ``dropout_op``; negative from the deepest
        self.dropout_stages = list(range(n_stages)) if dropout_stages is None else stage_indices(
            dropout_stages, n_stages, "dropout_stages")

        def block_at(stage: int) -> dict:
            return block if stage in self.dropout_stages else {**block, "dropout_op": None}

        self.time_embed = TimeEmbedding(time_embed_dim)
        self.encoder = nn.ModuleList()
        c_in = input_channels + num_classes
        for s in range(n_stages):
            self.encoder.append(self.build_encoder_stage(s, n_conv_enc[s], conv_op, c_in, features[s],
                                                         kernel_sizes[s], strides[s], block_at(s)))
            c_in = features[s]
        self.encoder_time = nn.ModuleList(TimeModulation(time_embed_dim, f) for f in features)

        # light image encoder, only as deep as the deepest DBSA-conditioned skip
        cond_depth = (max(self.dbsa_stages) + 1) if self.dbsa_stages else 0
        self.cond_features = [max(8, features[s] // cond_features_divisor) for s in range(cond_depth)]
        self.cond_encoder = nn.ModuleList()
        c_in = input_channels
        for s in range(cond_depth):
            self.cond_encoder.append(StackedConvBlocks(1, conv_op, c_in, self.cond_features[s], kernel_sizes[s],
                                                       strides[s], **block_at(s)))
            c_in = self.cond_features[s]

        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        transp = get_matching_convtransp(conv_op)
        for i, s in enumerate(range(n_stages - 2, -1, -1)):
            self.upsample.append(transp(features[s + 1], features[s], strides[s + 1], strides[s + 1],
                                        bias=conv_bias))
            self.decoder.append(StackedConvBlocks(n_conv_dec[s], conv_op, 2 * features[s], features[s],
                                                  kernel_sizes[s], 1, **block_at(s)))
        self.decoder_time = nn.ModuleList(TimeModulation(time_embed_dim, features[s])
                                          for s in range(n_stages - 2, -1, -1))
        self.seg_head = conv_op(features[0], num_classes, 1, 1, 0, bias=True)
        #: auxiliary heads, one per decoder stage below full resolution, lowest resolution first (decoder order)
        self.aux_heads = nn.ModuleList(conv_op(features[s], num_classes, 1, 1, 0, bias=True)
                                       for s in range(n_stages - 2, 0, -1)) if deep_supervision else nn.ModuleList()
        #: whether the heads were built; ``deep_supervision`` is the runtime switch (``set_deep_supervision``)
        self.has_deep_supervision_heads = bool(deep_supervision)
        self.deep_supervision = bool(deep_supervision)
        init = InitWeights_He(1e-2)
        for part in (self.encoder, self.cond_encoder, self.upsample, self.decoder, self.seg_head, self.aux_heads):
            part.apply(init)

        # attention modules are built after the He init: their zero-initialised projections must stay zero
        self.dbsa = nn.ModuleDict({str(s): DualBranchSpatialAttention(features[s], self.cond_features[s], conv_op,
                                                                      time_embed_dim, dbsa_dilations)
                                   for s in self.dbsa_stages})
        self.faa = nn.ModuleDict({str(s): FrequencyAwareAttention(features[s], conv_op, time_embed_dim, faa_num_bands)
                                  for s in self.faa_stages})
        use_onednn_convs(self)  # batch-1 CPU inference convolutions on oneDNN (``layers.prefers_onednn``)

    @staticmethod
    def build_encoder_stage(stage: int, n_blocks: int, conv_op: Type[nn.Module], input_channels: int,
                            output_channels: int, kernel_size: IntOrSeq, stride: IntOrSeq, block: dict) -> nn.Module:
        """Encoder stage ``stage``: ``[B, input_channels, *S]`` -> ``[B, output_channels, *S / stride]``, with a
        ``compute_conv_feature_map_size(input_size)`` method. Here ``n_blocks`` plain conv-norm-nonlin blocks, as in
        nnU-Net's ``PlainConvUNet``; subclasses change the block type. ``block``: conv bias, norm, dropout, nonlin."""
        return StackedConvBlocks(n_blocks, conv_op, input_channels, output_channels, kernel_size, stride, **block)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Switch the list output on or off (the heads' parameters stay in the module either way)."""
        if enabled and not self.has_deep_supervision_heads:
            raise ValueError("this VectorFieldUNet was built without deep supervision heads")
        self.deep_supervision = bool(enabled)

    def first_stage_parts(self) -> tuple[nn.Module, list[nn.Module]]:
        """(the conv-norm-nonlin block that sees ``image ⊕ x_t``, the modules after it in encoder stage 0)."""
        stage = self.encoder[0]
        return stage.convs[0], [stage.convs[1:]]

    def x_t_projection(self, x_t: Tensor) -> Tensor:
        """The first convolution's x_t part, no bias: ``x_t [B, K, *S]`` -> ``[B, F_0, *S / stride_0]``."""
        conv = self.first_stage_parts()[0].conv
        return conv_with(conv, x_t, conv.weight[:, self.input_channels:], None)

    def x_t_projection_state(self) -> tuple[int, int]:
        """Identifies the weights :meth:`x_t_projection` uses (storage, in-place version): it changes when weights
        are loaded or trained, so a cached projection can be checked against it."""
        weight = self.first_stage_parts()[0].conv.weight
        return weight.data_ptr(), weight._version

    def first_stage(self, image: Tensor, x_t: Optional[Tensor], x_t_projection: Optional[Tensor]) -> Tensor:
        """Encoder stage 0 on ``image ⊕ x_t`` (``image`` repeated to x_t's batch); with ``x_t_projection`` only the
        image channels are convolved, once per image; with ``x_t=None`` (the prior-free evaluation, see
        :meth:`forward`) only the image channels, and nothing is added."""
        if x_t is not None and x_t_projection is None:
            return self.encoder[0](torch.cat([repeat_batch(image, x_t.shape[0] // image.shape[0]),
                                              x_t.to(image.dtype)], 1))
        block, rest = self.first_stage_parts()
        conv = block.conv
        x = conv_with(conv, image, conv.weight[:, :self.input_channels], conv.bias)
        if x_t is not None:
            x = repeat_batch(x, x_t.shape[0] // image.shape[0]) + x_t_projection
        for module in [block.all_modules[1:], *rest]:
            x = module(x)
        return x

    def forward(self, image: Tensor, x_t: Optional[Tensor], t: Tensor,
                x_t_projection: Optional[Tensor] = None) -> Union[Tensor, list[Tensor]]:
        """``image`` ``[B, C_img, *S]``, ``x_t`` ``[B, K, *S]``, ``t`` ``[B]`` -> raw output ``[B, K, *S]``.
        ``x_t_projection``: :meth:`x_t_projection` of this ``x_t`` (then the first conv sees only the image).

        ``x_t=None``, the prior-free evaluation: only for a field with the time-scaled input at ``t = 0`` (every
        row), where the input ``t · x_t`` is zero whatever x_t is; the first conv then convolves the image alone
        (nnU-Net's first conv) and no x_t is drawn, scaled or added. Same output as any x_t at t = 0.

        N samples of the same images: ``image`` ``[B, C_img, *S]`` with ``x_t`` ``[N·B, K, *S]`` and ``t`` ``[N·B]``
        (sample-major, rows ``n·B … (n+1)·B − 1`` are sample n) is the forward of the image repeated N times, but
        the image-only work (conditioning encoder, the image part of the first conv) runs once per image
        (:attr:`shares_image_across_samples`).

        With deep supervision on and in training mode: a list of ``n_stages - 1`` tensors, highest resolution
        first, ``[B, K, *S]``, ``[B, K, *S / s_1]``, ``[B, K, *S / (s_1 s_2)]``, ... (``s_i``: stage i's stride),
        the first being the output above; the others are raw logits of the auxiliary heads."""
        if image.shape[1] != self.input_channels or (x_t is not None and x_t.shape[1] != self.num_classes):
            raise ValueError(f"expected {self.input_channels} image and {self.num_classes} x_t channels, got "
                             f"{image.shape[1]} and {None if x_t is None else x_t.shape[1]}")
        if x_t is None and not (self.time_scaled_x_t and t.shape[0] == image.shape[0] and not bool(t.any())):
            raise ValueError("x_t=None (prior-free) needs time_scaled_x_t and t = 0 for every image")
        if x_t is not None and x_t.shape[0] % image.shape[0]:
            raise ValueError(f"x_t batch {x_t.shape[0]} is not a multiple of the image batch {image.shape[0]}")
        reps = 1 if x_t is None else x_t.shape[0] // image.shape[0]
        temb = self.time_embed(t)
        if self.time_scaled_x_t and x_t is not None:  # conv(t · x_t) = t · conv(x_t): so is the cached projection
            scale = t.view(-1, *[1] * (x_t.ndim - 1))  # x_t and its projection have the same rank
            x_t = x_t * scale.to(x_t.dtype)
            if x_t_projection is not None:
                x_t_projection = x_t_projection * scale.to(x_t_projection.dtype)
        x = self.first_stage(image, x_t, x_t_projection)
        inplace = not torch.is_grad_enabled()  # modulate the stages' fresh outputs in place (TimeModulation)
        cond = image
        skips = []
        for s in range(self.n_stages):
            if s > 0:
                x = self.encoder[s](x)
            x = self.encoder_time[s](x, temb, inplace)
            if str(s) in self.faa:
                x = self.faa[str(s)](x, temb)
            if s < len(self.cond_encoder):
                cond = self.cond_encoder[s](cond)
            if s < self.n_stages - 1:
                skips.append(self.dbsa[str(s)](x, repeat_batch(cond, reps), temb) if str(s) in self.dbsa else x)
        with_aux = self.deep_supervision and self.training and self.has_deep_supervision_heads
        aux = []
        for i in range(self.n_stages - 1):
            x = torch.cat([self.upsample[i](x), skips[-(i + 1)]], 1)
            x = self.decoder_time[i](self.decoder[i](x), temb, inplace)
            if with_aux and i < self.n_stages - 2:
                aux.append(self.aux_heads[i](x))
        out = self.seg_head(x)
        return [out] + aux[::-1] if with_aux else out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Activation elements stored for backward at batch size 1 (nnU-Net's planner unit): every conv output,
        the time-modulated copies, the upsampled maps and the attention modules' own buffers."""
        total = np.int64(0)
        size = list(input_size)
        sizes = []
        for s in range(self.n_stages):
            total += self.encoder[s].compute_conv_feature_map_size(size)
            size = [i // j for i, j in zip(size, self.strides[s])]
            sizes.append(size)
            total += np.prod([self.features[s], *size], dtype=np.int64)  # time modulation output
        cond_size = list(input_size)
        for s, blk in enumerate(self.cond_encoder):
            total += blk.compute_conv_feature_map_size(cond_size)
            cond_size = [i // j for i, j in zip(cond_size, self.strides[s])]
        for key, mod in list(self.dbsa.items()) + list(self.faa.items()):
            total += np.int64(mod.compute_conv_feature_map_size(sizes[int(key)]))
        for i, s in enumerate(range(self.n_stages - 2, -1, -1)):
            total += 2 * np.prod([self.features[s], *sizes[s]], dtype=np.int64)  # upsampled + modulated
            total += self.decoder[i].compute_conv_feature_map_size(sizes[s])
        total += np.prod([self.num_classes, *sizes[0]], dtype=np.int64)
        for s in range(self.n_stages - 2, 0, -1)[:len(self.aux_heads)]:
            total += np.prod([self.num_classes, *sizes[s]], dtype=np.int64)  # auxiliary head outputs
        return total

