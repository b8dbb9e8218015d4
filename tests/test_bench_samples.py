"""benchmarks/bench_samples.py (the K-sample cost curve) runs on the CPU from gpu_check's tiny plans."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_samples.py"


def test_reports_each_plan_thread_count_and_k(tmp_path):
    out = tmp_path / "samples.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--ks", "1", "2", "--threads", "1",
                           "--warmup", "0", "--iterations", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["plan"], r["threads"], r["K"]) for r in rows] == [
        ("tiny_a/3d", 1, 1), ("tiny_a/3d", 1, 2), ("tiny_b/3d", 1, 1), ("tiny_b/3d", 1, 2)]
    for one, two in (rows[0:2], rows[2:4]):
        assert one["shared / (K x one)"] == 1.0
        assert two["K x one ms"] == pytest.approx(2 * one["shared ms"], abs=0.11)
        assert two["shared per sample ms"] == pytest.approx(two["shared ms"] / 2, abs=0.06)
        assert two["repeated-image ms"] > 0


def test_refuses_a_curve_that_does_not_start_at_one_sample():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--ks", "2", "4"], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "--ks must start with 1" in proc.stderr


def test_steps_two_shares_the_t0_evaluation_across_k(tmp_path):
    """``--steps 2``: the rows say so and carry no one-step repeated-image reference (the 1 + K·(N − 1) evaluation
    count is checked on the sampler in tests/inference/test_sampler.py; no timings in tests)."""
    out = tmp_path / "samples.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--ks", "1", "2", "--threads", "1", "--steps", "2",
                           "--warmup", "0", "--iterations", "1", "--plans_filter", "tiny_a", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["plan"], r["steps"], r["K"]) for r in rows] == [("tiny_a/3d", 2, 1), ("tiny_a/3d", 2, 2)]
    assert all("repeated-image ms" not in r and r["one per call ms"] > 0 for r in rows)
