"""benchmarks/value_recalibration.py: the three stages it scores are raw, T alone and T + the product's map;
the pooled stage fits on the validation cases of the model's fold and of the other folds' members."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from value_recalibration import fit, pooled_rows, score, stage_fn  # noqa: E402

from medflowseg_nn.temperature import apply_temperature  # noqa: E402


def over_confident_cases(seed: int, n: int = 3) -> dict:
    """Binary cases: a foreground block whose predicted probability is 0.95 inside but right only 80 % of the
    time (labels drawn), background certain and right."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        p1 = np.zeros((12, 12, 6), np.float32)
        p1[3:9, 3:9] = 0.95
        ref = ((p1 > 0) & (rng.random(p1.shape) < 0.8)).astype(np.int64)
        cases[f"c{seed}_{i}"] = (np.stack([1 - p1, p1]), ref)
    return cases


def test_stages_are_raw_tempered_and_mapped_and_the_map_helps():
    validation, test = over_confident_cases(0), over_confident_cases(1)
    calibration = fit(validation, dilation=1)
    p = next(iter(test.values()))[0]
    assert np.array_equal(stage_fn(calibration, "raw")(p), p)
    np.testing.assert_allclose(stage_fn(calibration, "+ T")(p), apply_temperature(p, calibration.temperature))
    np.testing.assert_allclose(stage_fn(calibration, "+ T + map")(p), calibration.probabilities(p))
    scores = {s: score(list(test), lambda c: (stage_fn(calibration, s)(test[c][0]), test[c][1]), 1)
              for s in ("raw", "+ T", "+ T + map")}
    assert set(scores["raw"]) == {"ece", "aurc", "nll", "brier"}
    # two confidence levels (0.95 foreground, 1.0 background): T cannot fix both, the map can
    assert scores["+ T + map"]["ece"] < 0.03 < scores["raw"]["ece"]
    assert scores["+ T + map"]["ece"] < scores["+ T"]["ece"]


def test_pooled_rows_fit_on_the_own_and_the_other_members_validation_cases():
    val = {f"nnunet_f{f}_s0": over_confident_cases(10 + f) for f in (0, 1)}
    val["nnunet_f0_s1"] = over_confident_cases(20)
    test = over_confident_cases(30)
    calibrated = {k: ({**v, **test}, fit(v, 1)) for k, v in val.items()}
    args = argparse.Namespace(ensemble_folds=[0, 1], ours_ensemble_folds=[], seeds=[0], ensemble_epochs=None,
                              epochs=1, roi_dilation=1)
    rows = {r["model"]: r for r in pooled_rows(list(test), calibrated, val, args)}
    assert set(rows) == {"nnunet_f0_s0", "nnunet_f0_s1", "nnunet ensemble nnunet_f0_s0+nnunet_f1_s0"}
    expected = fit({**val["nnunet_f0_s1"], **val["nnunet_f1_s0"]}, 1)  # seed 1's own cases + the fold-1 member's
    assert rows["nnunet_f0_s1"]["T"] == expected.temperature
    probs = calibrated["nnunet_f0_s1"][0]
    assert rows["nnunet_f0_s1"]["ece"] == score(list(test), lambda c: (expected.probabilities(probs[c][0]),
                                                                        probs[c][1]), 1)["ece"]
    assert all(r["stage"] == "+ pooled T + map" for r in rows.values())
