"""A packed ensemble's members recalibrated one by one before their average, at prediction time (issue #9).

A fold ensemble is calibrated best when each fold's probabilities are tempered and top-label mapped before the
average (``benchmarks/RESULTS.md``: nnU-Net's 3-fold ensemble, test ROI ECE 0.0034 after per-member T + map, 0.0098
with T only); a packed ensemble (:mod:`medflowseg_nn.networks.member_ensemble`) is the same inside one model. Its
member temperatures and maps were fitted on each member's stitched predictions of whole validation cases
(:mod:`medflowseg_nn.trainers.member_temperatures`), so here each member is stitched on its own (every tile and
mirroring, as the predictor does for a fold), its stitched logits divided by its T (the network's
``member_temperature``), its probabilities mapped by its map (:mod:`medflowseg_nn.recalibration`), and the members'
probabilities averaged — the calibration applied to what it was fitted on (the joint pass without maps applies T
inside the network, per tile; on the 2d protocol both give the same test Dice to four decimals). Measured end to end
(``benchmarks/value_product.py``, RESULTS 2026-12-06 23:12, two seeds): test ROI ECE 0.0016 / 0.0013 against
0.0051 / 0.0054 with member temperatures only and 0.0034 for nnU-Net's 3-fold ensemble.

What the predictor gets, per fold (:class:`~medflowseg_nn.inference.sliding_window.CasePrediction`, on the CPU):
``logits`` = log of the members' mean tempered probability (the segmentation), ``mapped`` = log of the members'
mean mapped probability (the exported probabilities), and, when asked, ``votes`` summed over the members' K samples
for the (member, sample) disagreement. The network's compute is the same as the joint pass (each member runs once
per tile); only the stitching is repeated per member.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from medflowseg_nn.errors import UserError
from medflowseg_nn.inference.sliding_window import CasePrediction
from medflowseg_nn.networks.member_ensemble import MemberEnsembleField
from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.recalibration import TopLabelMap, apply_top_label_map
from medflowseg_nn.temperature import FoldCalibration

__all__ = ["member_field", "check_member_maps", "predict_members"]
_EPS = 1e-12


def member_field(segmenter: nn.Module) -> Optional[MemberEnsembleField]:
    """The packed ensemble a :class:`~medflowseg_nn.inference.sampler.FlowSegmenter` samples, else ``None``."""
    field = unwrap(getattr(segmenter, "field", segmenter))
    return field if isinstance(field, MemberEnsembleField) else None


def check_member_maps(field: Optional[MemberEnsembleField], calibrations: Sequence[Optional[FoldCalibration]],
                      where: str) -> None:
    """A :class:`UserError` when a fold's calibration holds member maps that ``field`` (the loaded model's packed
    ensemble, or ``None``) cannot take: not a packed ensemble, or another number of members."""
    members = 0 if field is None else len(field.members)
    for calibration in calibrations:
        if calibration is not None and calibration.member_maps and len(calibration.member_maps) != members:
            raise UserError(f"{where}: a temperature.json holds {len(calibration.member_maps)} member maps, but the "
                            f"model is {f'a {members}-member ensemble' if members else 'not a packed ensemble'}; "
                            f"delete the fold's temperature.json or refit it")


def predict_members(predict_one: Callable[[], CasePrediction], field: MemberEnsembleField,
                    maps: Sequence[TopLabelMap]) -> CasePrediction:
    """One case, each member stitched alone by ``predict_one`` (the predictor's pass with the loaded weights:
    ``CasePrediction`` with the member's own logits ``[C, *S]`` and, when it returns them, votes) → the fold's
    ``CasePrediction`` (module docstring): member m's logits divided by ``field.member_temperature[m]``, mapped by
    ``maps[m]``."""
    if len(maps) != len(field.members):
        raise ValueError(f"{len(maps)} member maps for a {len(field.members)}-member ensemble")
    tempered: Optional[Tensor] = None
    mapped: Optional[Tensor] = None
    votes: Optional[Tensor] = None
    for index, top_label_map in enumerate(maps):
        with field.single_member(index):
            one = predict_one()
        p = torch.softmax(one.logits.float().cpu() / float(field.member_temperature[index]), 0)
        q = apply_top_label_map(p, top_label_map)
        tempered = p if tempered is None else tempered + p
        mapped = q if mapped is None else mapped + q
        if one.votes is not None:
            votes = one.votes if votes is None else votes + one.votes
    m = len(maps)
    return CasePrediction(torch.log((tempered / m).clamp_min(_EPS)), votes=votes,
                          mapped=torch.log((mapped / m).clamp_min(_EPS)))
