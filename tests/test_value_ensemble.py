"""benchmarks/value_ensemble.py: a fold ensemble's mean, its member-tempered row and its temperatures."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from value_ensemble import fold_ensemble  # noqa: E402

from medflowseg_nn.temperature import apply_temperature  # noqa: E402


class Recorder:
    """Stands in for ``value_report.RunScores``: keeps what ``add`` was given and returns a fixed Dice."""

    def __init__(self):
        self.calls = []

    def add(self, case, probs, ref, spacing, seconds, out_dir, img=None):
        self.calls.append((case, probs, seconds, out_dir))
        return 0.5


def two_member_outputs():
    a = np.array([[0.9, 0.2], [0.1, 0.8]], dtype=np.float32)  # [C=2, S=2]
    b = np.array([[0.5, 0.6], [0.5, 0.4]], dtype=np.float32)
    return {"m0": (a, 1.0), "m1": (b, 2.5), "other": (np.ones_like(a), 9.0)}


def test_fold_ensemble_reuses_known_temperatures_and_fits_the_rest_on_their_own_fold():
    fitted = []
    ens = fold_ensemble("e", "row", [0, 2], lambda f: f"m{f}", {"m0": 1.5},
                        lambda rid, fold: fitted.append((rid, fold)) or 2.0)
    assert ens.members == ("m0", "m2")
    assert dict(ens.temperatures) == {"m0": 1.5, "m2": 2.0}
    assert fitted == [("m2", 2)]
    assert ens.rows() == {"e": "row", "e|f0": "row: each member alone", "e|f2": "row: each member alone",
                          "e+T": "row + T", "e|f0+T": "row: each member alone + T",
                          "e|f2+T": "row: each member alone + T"}
    plain = fold_ensemble("e", "row", [0, 2], lambda f: f"m{f}", {"m0": 1.5}, None)
    assert dict(plain.temperatures) == {} and list(plain.rows()) == ["e", "e|f0", "e|f2"]


@pytest.mark.parametrize("tempered", [False, True])
def test_ensemble_scores_the_members_mean_and_the_mean_of_the_tempered_members(tempered, tmp_path):
    outputs = two_member_outputs()
    temps = {"m0": 2.0, "m1": 0.5}
    ens = fold_ensemble("e", "row", [0, 1], lambda f: f"m{f}", temps, (lambda r, f: 1.0) if tempered else None)
    scores = {sid: Recorder() for sid in ens.rows()}
    ref, spacing = np.zeros(2, dtype=int), np.ones(1)
    assert ens.add("case_1", outputs, scores, ref, spacing, tmp_path) == 0.5
    case, probs, seconds, out_dir = scores["e"].calls[0]
    assert case == "case_1" and seconds == pytest.approx(3.5) and out_dir == tmp_path / "e"
    np.testing.assert_allclose(probs, [[0.7, 0.4], [0.3, 0.6]], rtol=1e-6)  # mean of m0 and m1, not "other"
    if tempered:
        _, probs_t, seconds_t, out_t = scores["e+T"].calls[0]
        expected = (apply_temperature(outputs["m0"][0], 2.0) + apply_temperature(outputs["m1"][0], 0.5)) / 2
        np.testing.assert_allclose(probs_t, expected, rtol=1e-6)
        assert seconds_t == pytest.approx(3.5) and out_t is None
        np.testing.assert_allclose(probs_t.sum(0), 1.0, rtol=1e-5)
        assert not np.allclose(probs_t, probs)  # T = 2 flattens m0, T = 0.5 sharpens m1
    else:
        assert "e+T" not in scores
    for fold, member in ((0, "m0"), (1, "m1")):  # each member alone, with its own fold's T in the + T row
        _, alone, sec, out = scores[f"e|f{fold}"].calls[0]
        assert alone is outputs[member][0] and sec == outputs[member][1] and out is None
        if tempered:
            np.testing.assert_allclose(scores[f"e|f{fold}+T"].calls[0][1],
                                       apply_temperature(outputs[member][0], temps[member]), rtol=1e-6)
