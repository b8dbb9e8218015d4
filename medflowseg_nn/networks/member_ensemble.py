"""A packed ensemble: M narrow, independent vector fields in one model, trained together (issue #9).

Laurent et al., "Packed-Ensembles for efficient uncertainty estimation" (ICLR 2023): M members, each ``α / M`` of
the base network's width, trained side by side in one model on the same steps; at α = 2, M = 4 (each member half
as wide) the ensemble costs about one base network's convolution FLOPs (M · (α / M)² = 1) and, on their image
benchmarks, is calibrated about as well as a deep ensemble of M full networks. What a fold ensemble has over one
model here is model averaging — independently initialised networks (``benchmarks/RESULTS.md`` 2026-12-06 15:42:
three fold-0 models of different seeds, calibrated on the same cases, get most of the fold ensemble's ECE edge) —
and that is what the members are. Unlike MIMO (:mod:`medflowseg_nn.networks.mimo`, one set of weights shared by
all members), nothing is shared: no member sees another's features.

Packed-Ensembles implement the members as grouped convolutions of one wide network; here each member is its own
:class:`~medflowseg_nn.networks.vector_field_unet.VectorFieldUNet` run in turn, because the flow's attention
modules (DBSA, FAA) and time modulation mix all channels of a stage — grouped convolutions alone would not keep the
members apart. The same function as the grouped form; neither MONAI nor torchmetrics has it.

Signature as :class:`~medflowseg_nn.networks.mimo.MimoVectorField`, so the trainer's MIMO batch (each member its
own shuffle of the batch, ``trainers.mimo``) and the samplers need nothing new:

* **training mode** — ``image`` ``[G·M, C, *S]``, ``x_t`` ``[G·M, K, *S]`` (or ``None``), ``t`` ``[G·M]``; row r
  goes to member ``r mod M``; the output (each deep-supervision output too) is ``[G·M, K, *S']`` in the input's
  row order. The trainer's loss is a mean over the G·M rows, which would give each member 1 / M of the gradient of
  its own loss (its learning rate divided by M under SGD); each member's output passes its gradient back M times
  larger, so each member trains as it would alone on its G rows.
* **eval mode** — ``image`` ``[B, C, *S]``, ``x_t`` ``[N·B, K, *S]`` or ``None``, ``t`` ``[N·B]``: every member on
  the same input; the output is the members' mean probability as logits, ``log(1/M Σ_m softmax(raw_m))``
  ``[N·B, K, *S]`` (x1 parameterisation with softmax outputs only; the config refuses the rest).

Member temperatures (buffer ``member_temperature`` ``[M]``, saved with the weights, 1 = off): in eval mode member m's
logits are divided by its T_m before the average — each member calibrated before averaging, as ``mfs_predict``
averages tempered folds; one temperature on the plain average leaves one model's calibration (``benchmarks/
RESULTS.md`` 2026-12-06; ``trainers.member_temperatures`` fits them after training).

One member alone (:meth:`MemberEnsembleField.single_member`, eval mode): the output is member m's own logits
``raw_m`` ``[N·B, K, *S]`` (untempered), so that the predictor can stitch each member on its own and apply its T and
top-label map to the stitched case, as they were fitted, before averaging, as it does with folds
(:mod:`medflowseg_nn.inference.member_calibration`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from medflowseg_nn.networks.mimo import mean_probability_logits

Output = Union[Tensor, list[Tensor]]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged; its gradient is multiplied by ``scale`` on the way back."""
    return _ScaleGradient.apply(x, scale)


def member_width_features(features: Sequence[int], width: float) -> list[int]:
    """A member's features per stage: ``width`` × the base network's, rounded, at least 1 each."""
    return [max(1, int(round(f * width))) for f in features]


def interleave(outputs: Sequence[Tensor]) -> Tensor:
    """M tensors ``[G, K, *S]`` (member m's outputs for rows m, m + M, …) -> ``[G·M, K, *S]`` in row order."""
    return torch.stack(list(outputs), 1).reshape(-1, *outputs[0].shape[1:])


class MemberEnsembleField(nn.Module):
    """M independent vector fields with one field's signature (module docstring); ``members`` ≥ 2 fields of the
    same input / output channels."""

    #: ``forward`` takes ``x_t=None`` at t = 0 when the members do (the prior-free evaluation)
    accepts_prior_free = True
    #: in eval mode one image batch serves N samples' x_t (each member repeats it)
    shares_image_across_samples = True
    #: eval mode: ``None`` = the members' tempered average; an index = that member's own logits alone
    member_index: Optional[int] = None

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a member ensemble needs at least 2 members, got {len(members)}")
        channels = {(m.input_channels, m.num_classes) for m in members}
        if len(channels) != 1:
            raise ValueError(f"the members' image / x_t channels differ: {sorted(channels)}")
        self.members = nn.ModuleList(members)
        self.input_channels, self.num_classes = channels.pop()
        self.register_buffer("member_temperature", torch.ones(len(members)))

    def set_member_temperatures(self, temperatures: Sequence[float]) -> None:
        """Member m's logits are divided by ``temperatures[m]`` (> 0) in eval mode."""
        values = torch.as_tensor(list(temperatures), dtype=self.member_temperature.dtype)
        if values.shape != self.member_temperature.shape or not bool((values > 0).all()):
            raise ValueError(f"need {len(self.members)} positive member temperatures, got {list(temperatures)}")
        self.member_temperature.copy_(values)

    @contextmanager
    def single_member(self, index: int) -> Iterator["MemberEnsembleField"]:
        """Within the block, eval-mode outputs are member ``index``'s own logits alone (module docstring)."""
        if not 0 <= index < len(self.members):
            raise ValueError(f"member {index} of a {len(self.members)}-member ensemble")
        previous, self.member_index = self.member_index, index
        try:
            yield self
        finally:
            self.member_index = previous

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "member_temperature"
        if key not in state_dict:  # weights saved before member temperatures existed: every member at T = 1
            state_dict[key] = torch.ones_like(self.member_temperature)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def time_scaled_x_t(self) -> bool:
        return self.members[0].time_scaled_x_t

    @property
    def has_deep_supervision_heads(self) -> bool:
        return self.members[0].has_deep_supervision_heads

    def set_deep_supervision(self, enabled: bool) -> None:
        for member in self.members:
            member.set_deep_supervision(enabled)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Activation elements of all members (they are all held for backward)."""
        return np.int64(sum(int(m.compute_conv_feature_map_size(input_size)) for m in self.members))

    def forward(self, image: Tensor, x_t: Optional[Tensor], t: Tensor) -> Output:
        """See the module docstring (training: row r to member r mod M; eval: every member, mean probability)."""
        m = len(self.members)
        if not self.training and self.member_index is not None:
            return self.members[self.member_index](image, x_t, t)
        if not self.training:
            raws = [member(image, x_t, t) / self.member_temperature[i] for i, member in enumerate(self.members)]
            return mean_probability_logits(torch.cat(raws, 1), m)
        if image.shape[0] % m or (x_t is not None and x_t.shape[0] != image.shape[0]):
            raise ValueError(f"in training a member ensemble takes groups of {m} rows, one x_t row per image row; "
                             f"got {image.shape[0]} image and {None if x_t is None else x_t.shape[0]} x_t rows")
        outs = [member(image[i::m], None if x_t is None else x_t[i::m], t[i::m])
                for i, member in enumerate(self.members)]
        if isinstance(outs[0], (list, tuple)):
            return [scale_gradient(interleave([o[level] for o in outs]), float(m)) for level in range(len(outs[0]))]
        return scale_gradient(interleave(outs), float(m))
