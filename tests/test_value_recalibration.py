"""benchmarks/value_recalibration.py: the three stages it scores are raw, T alone and T + the product's map."""
from __future__ import annotations

import sys

import numpy as np

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from value_recalibration import fit, score, stage_fn  # noqa: E402

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
