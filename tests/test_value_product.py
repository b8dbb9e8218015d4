"""benchmarks/value_product.py's scoring: each row is value_report.RunScores over the test cases (Dice, ROI ECE /
AURC / NLL, ρ over cases, seconds), checked on predictors whose answers are known by hand."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import value_product  # noqa: E402


def one_hot(labels: np.ndarray, c: int = 3) -> np.ndarray:
    return np.moveaxis(np.eye(c)[labels], -1, 0).astype(np.float32)


def cases(n: int = 4) -> dict:
    out = {}
    for i in range(n):
        ref = np.zeros((1, 8, 8), np.int64)
        ref[0, 2:5, 2:4 + i % 3] = 1
        ref[0, 5, 2:6] = 2
        out[f"c{i}"] = {"ref": ref, "spacing": np.ones(3)}
    return out


def test_a_perfect_predictor_scores_dice_one_and_no_calibration_error():
    inputs = cases()
    scores = value_product.score_cases(list(inputs), lambda c: (one_hot(inputs[c]["ref"]), 0.5), inputs, [1, 2], 1)
    row = value_product.summary_row(0, "perfect", scores)
    assert row["dice"] == pytest.approx(1.0) and row["ece"] == pytest.approx(0.0, abs=1e-6)
    assert row["aurc"] == pytest.approx(0.0, abs=1e-6) and row["s_per_case"] == pytest.approx(0.5)
    assert set(value_product.COLUMNS) - {"rho_dis"} <= set(row)  # rho_dis: rows of several members only
    assert set(row["per_case"]) == set(inputs) and row["per_case"]["c1"]["dice_fg"] == pytest.approx(1.0)


def test_a_right_but_underconfident_predictor_has_the_ece_computed_by_hand():
    inputs = cases()

    def predict(case):  # the right class at 0.7, the others 0.15 each: accuracy 1, confidence 0.7
        p = 0.15 + 0.55 * one_hot(inputs[case]["ref"])
        return p, 1.0
    row = value_product.summary_row(1, "underconfident", value_product.score_cases(list(inputs), predict, inputs,
                                                                                   [1, 2], 1))
    assert row["dice"] == pytest.approx(1.0) and row["ece"] == pytest.approx(0.3, abs=1e-5)
    assert row["nll"] == pytest.approx(-np.log(0.7), abs=1e-5)


def test_fold_disagreement_and_its_rank_correlation_by_hand():
    a, b = one_hot(np.array([[0, 1, 1, 2]])), one_hot(np.array([[0, 1, 2, 2]]))
    # three members: voxel 2 has labels (1, 2, 1): 2 of the 3 pairs differ
    assert np.allclose(value_product.fold_disagreement([a, b, a]), [[0, 0, 2 / 3, 0]])
    inputs = cases()
    dis = {c: float(i) for i, c in enumerate(inputs)}  # disagreement rising with the error below
    scores = value_product.score_cases(list(inputs), lambda c: (one_hot(np.where(
        np.arange(8)[None, None, :] < 2 + int(c[1]), 0, inputs[c]["ref"])), 0.0), inputs, [1, 2], 1)
    assert value_product.rho_of(dis, scores)["rho_dis"] == pytest.approx(1.0)
    assert value_product.rho_of(dis, scores)["disagreement"] == dis
    assert value_product.rho_of({}, scores) == {}


def test_the_reference_free_flags_rank_cases_whose_doubt_grows_with_their_error():
    inputs = cases()

    def predict(case):  # columns < 2 + i turned to soft background (0.5 / 0.3 / 0.2): more error, more doubt
        ref = inputs[case]["ref"]
        p = one_hot(ref)
        soft = np.broadcast_to(np.arange(8) < 2 + int(case[1]), ref.shape)
        p[:, soft] = np.array([0.5, 0.3, 0.2])[:, None]
        return p, 0.0
    row = value_product.summary_row(0, "doubtful", value_product.score_cases(list(inputs), predict, inputs, [1, 2], 1))
    assert row["dice"] < 1
    assert row["rho_ede"] == pytest.approx(1.0) and row["rho_all"] == pytest.approx(1.0)
