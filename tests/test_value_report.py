"""benchmarks/value_report.py as a script: bench_value JSONs of separate runs (seeds) merged into one table."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "value_report.py"


def run_summary(dice: float, ece_roi: float) -> dict:
    cal = {"ece": 0.01, "brier": 0.1, "nll": 0.2, "aurc": 0.003}
    return {"run": "r", "dice_fg": dice, "hd95": 5.0, "hd95_n_inf": 0, "s_per_case": 1.0, "n_cases": 3,
            "all": cal, "roi": {**cal, "ece": ece_roi}, "spearman_all": {"rho": 0.1}, "spearman_roi": {"rho": 0.2},
            "spearman_ede": {"rho": 0.3}}


def test_merge_two_seeds_gives_mean_and_spread(tmp_path):
    files = []
    for seed, (dice, ece) in enumerate([(0.70, 0.02), (0.80, 0.04)]):
        payload = {"head": f"seed {seed}", "results": {"ours 1 step": [run_summary(dice, ece)]}}
        if seed == 1:
            payload["results"]["ours K=4 Heun N=2"] = [run_summary(0.9, 0.05)]
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(payload))
    out = tmp_path / "merged.md"
    res = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO_ROOT / "benchmarks")
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert "| ours 1 step | 2 | 0.750 (0.700–0.800) |" in text
    assert "| ours K=4 Heun N=2 | 1 | 0.900 |" in text
    assert "0.030 (0.020–0.040)" in text  # ROI ECE mean (min–max)
