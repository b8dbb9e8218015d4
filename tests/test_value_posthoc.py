"""benchmarks/value_posthoc.py: reference-free case-level scores from a bench_value run's saved probabilities."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "value_posthoc.py"


def confident_case(shape, flip: float) -> np.ndarray:
    """[3, *shape] probabilities: label 1 in a central block, label 2 beside it; the foreground's top class has
    probability 1 - flip (the rest on background), the background elsewhere is certain."""
    seg = np.zeros(shape, dtype=int)
    seg[2:6, 2:6, 2:4] = 1
    seg[2:6, 2:6, 4:6] = 2
    probs = np.zeros((3, *shape), dtype=np.float32)
    probs[0] = 1.0
    for c in (1, 2):
        probs[c][seg == c] = 1 - flip
        probs[0][seg == c] = flip
    return probs


@pytest.mark.parametrize("temperature", [None, 2.0])
def test_scores_rank_cases_by_their_uncertainty(tmp_path, temperature):
    run = tmp_path / "value_predictions" / "ours"
    run.mkdir(parents=True)
    flips = [0.05, 0.15, 0.25, 0.35]  # more probability mass off the top class: more uncertain
    per_case = {}
    for i, flip in enumerate(flips):
        np.savez_compressed(run / f"case{i}.npz", probabilities=confident_case((8, 8, 8), flip))
        per_case[f"case{i}"] = {"dice_fg": 0.9 - 0.1 * i}  # and worse
    rid = "ours" if temperature is None else "ours+T"
    result = tmp_path / "bench_value_x.json"
    result.write_text(json.dumps({"per_case": {rid: per_case}, "temperatures": {"ours": temperature}}))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(result), "--work", str(tmp_path), "--roi_dilation", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "bench_value_x_posthoc.json").read_text())["rows"]
    assert row["run"] == rid and row["cases"] == 4 and row["mean 1-Dice"] == pytest.approx(0.25)
    assert row["T"] == ("" if temperature is None else 2.0)
    for key in ("ρ(EDE, 1−Dice)", "ρ(H all, 1−Dice)", "ρ(H pred-roi, 1−Dice)"):
        assert row[key] == pytest.approx(1.0), key
    assert 0 < row["mean EDE"] < 1  # soft foreground: the model expects some Dice error
