"""Each member of a packed ensemble alone, mapped before the average (``inference.member_calibration``): the
member outputs the field gives one at a time, the averages computed by hand, the refusals, and the calibration
file that carries the maps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medflowseg_nn.errors import UserError
from medflowseg_nn.inference.member_calibration import check_member_maps, member_field, predict_members
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.inference.sliding_window import CasePrediction
from medflowseg_nn.networks.member_ensemble import MemberEnsembleField
from medflowseg_nn.recalibration import TopLabelMap, apply_top_label_map
from medflowseg_nn.temperature import FoldCalibration, load_calibration, save_temperature
from tests.networks.test_mimo import small_field

MAPS = (TopLabelMap((0.3, 0.9), (0.5, 0.8)), TopLabelMap((0.5,), (0.7,)), TopLabelMap((0.0, 1.0), (0.0, 1.0)))


def packed(dim: int) -> MemberEnsembleField:
    field = MemberEnsembleField([small_field("plain", dim, 1, 3, seed=s) for s in range(3)]).eval()
    field.set_member_temperatures([0.5, 1.0, 2.0])
    return field


@pytest.mark.parametrize("dim", [2, 3])
def test_single_member_gives_that_members_own_logits_and_restores_the_average(dim):
    field = packed(dim)
    image, t = torch.randn(2, 1, *[16] * dim), torch.zeros(2)
    with torch.no_grad():
        average = field(image, None, t)
        for m in range(3):
            with field.single_member(m):
                assert torch.equal(field(image, None, t), field.members[m](image, None, t))
        assert torch.equal(field(image, None, t), average)  # the block left the average on
        with pytest.raises(ValueError, match="member 3"), field.single_member(3):
            pass


@pytest.mark.parametrize("dim", [2, 3])
def test_predict_members_averages_tempered_and_mapped_member_probabilities(dim):
    field = packed(dim)
    image, t = torch.randn(1, 1, *[16] * dim), torch.zeros(1)

    def predict_one() -> CasePrediction:  # a stitched case of one patch: the field's output, classes first
        logits = field(image, None, t)[0]
        return CasePrediction(logits, votes=torch.nn.functional.one_hot(logits.argmax(0), 3).movedim(-1, 0).float())

    with torch.no_grad():
        out = predict_members(predict_one, field, MAPS)
        members = [torch.softmax(field.members[m](image, None, t)[0] / T, 0) for m, T in enumerate((0.5, 1.0, 2.0))]
    assert torch.allclose(out.logits.exp(), sum(members) / 3, atol=1e-6)
    assert torch.allclose(out.logits, torch.log(torch.softmax(field(image, None, t)[0], 0)), atol=1e-5)
    mapped = sum(apply_top_label_map(p, m) for p, m in zip(members, MAPS)) / 3
    assert torch.allclose(out.mapped.exp(), mapped, atol=1e-6)
    assert not torch.allclose(out.mapped, out.logits, atol=1e-2)  # the maps do something
    assert out.votes.sum(0).eq(3).all()  # one vote per member per voxel
    with pytest.raises(ValueError, match="2 member maps"):
        predict_members(predict_one, field, MAPS[:2])


def test_member_field_finds_the_packed_ensemble_under_the_sampler_and_maps_are_checked():
    field = packed(2)
    segmenter = FlowSegmenter(field, 3, "x1")
    assert member_field(segmenter) is field and member_field(FlowSegmenter(field.members[0], 3, "x1")) is None
    check_member_maps(field, [FoldCalibration(1.0, member_maps=MAPS), None, FoldCalibration(1.3)], "model")
    with pytest.raises(UserError, match="2 member maps.*3-member"):
        check_member_maps(field, [FoldCalibration(1.0, member_maps=MAPS[:2])], "model")
    with pytest.raises(UserError, match="not a packed ensemble"):
        check_member_maps(None, [FoldCalibration(1.0, member_maps=MAPS)], "model")


def test_member_maps_round_trip_through_temperature_json_and_are_refused_beside_a_fold_t(tmp_path):
    save_temperature(str(tmp_path), 1.0, {"sampler": {"steps": 1}}, member_maps=MAPS)
    loaded = load_calibration(str(tmp_path), {"steps": 1})
    assert loaded == FoldCalibration(1.0, None, MAPS)
    assert loaded.summary == "T 1.000 + 3 member maps" and FoldCalibration(1.2, MAPS[0]).summary == "T 1.200 + map"
    assert load_calibration(str(tmp_path), {"steps": 2}) is None  # fitted for other sampler settings
    with pytest.raises(UserError, match="before the average"):
        loaded.probabilities(np.full((3, 2, 2), 1 / 3, np.float32))
    with pytest.raises(UserError, match="T = 1"):
        save_temperature(str(tmp_path), 1.2, {}, member_maps=MAPS)
    content = json.load(open(tmp_path / "temperature.json"))
    json.dump({**content, "temperature": 1.5}, open(tmp_path / "temperature.json", "w"))
    with pytest.raises(UserError, match="not a temperature file"):
        load_calibration(str(tmp_path))
