"""benchmarks/value_members.py: the foreground Dice (``calibration_folder.argmax_foreground_dice``), the member
disagreement and the three recalibration stages it reports, on probabilities whose answers are known by hand."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from medflowseg_nn.calibration_folder import argmax_foreground_dice
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import value_members  # noqa: E402


def one_hot(labels: np.ndarray, c: int = 3) -> np.ndarray:
    return np.moveaxis(np.eye(c)[labels], -1, 0)


def test_the_argmax_foreground_dice_it_reports_by_hand():
    ref = np.array([[0, 1, 1, 2]])
    pred = one_hot(np.array([[0, 1, 2, 2]]))
    assert argmax_foreground_dice(pred, ref) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert argmax_foreground_dice(one_hot(np.zeros((1, 4), int)), np.zeros((1, 4), int)) == 1.0


def test_disagreement_is_the_roi_share_of_differing_argmax_averaged_over_pairs():
    ref = np.zeros((1, 9), int)
    ref[0, 4] = 1  # ROI with dilation 1: voxels 3, 4, 5
    a, b = np.zeros((1, 9), int), np.zeros((1, 9), int)
    b[0, 4] = 1  # differs from a on 1 of the 3 ROI voxels; the voxel outside the ROI does not count
    b[0, 0] = 2
    models = [{"c": (one_hot(x), ref)} for x in (a, b, a)]
    assert value_members.disagreement(models, ["c"], 1) == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)


def test_stage_rows_of_a_calibrated_predictor_keep_t_near_one_and_score_three_stages():
    rng = np.random.default_rng(0)
    probs = {}
    for i in range(6):  # labels drawn from the predicted probabilities: calibrated by construction
        p = rng.dirichlet([1.0, 1.0, 1.0], size=(20, 30)).transpose(2, 0, 1)
        y = (p.cumsum(0) < rng.random((20, 30))).sum(0)
        y[0, 0] = 1  # every reference has foreground, so its ROI is not empty
        probs[f"c{i}"] = (p.astype(np.float32), y)
    rows = value_members.stage_rows("m", probs, ["c0", "c1", "c2"], ["c3", "c4", "c5"], 30)
    assert [r["stage"] for r in rows] == list(value_members.STAGES)
    assert 0.8 < rows[0]["T"] < 1.25 and rows[0]["ece"] < 0.05
    assert all(0 <= r["dice"] <= 1 for r in rows)
