"""benchmarks/bench_value.py's held-out split: the last case ids are the test set, the rest a 5-fold split, and
the file is replaced atomically (value_models.py processes started side by side read it while another writes)."""
from __future__ import annotations

import json
import sys

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_value  # noqa: E402


def test_split_holds_out_the_last_cases_and_rewrites_atomically(tmp_path):
    cases = [f"case_{i:03d}" for i in range(20)]
    test, splits = bench_value.write_splits(tmp_path, cases, 5)
    assert test == cases[-5:]
    assert len(splits) == 5
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == cases[:-5]
    path = tmp_path / "splits_final.json"
    assert json.loads(path.read_text()) == splits
    stamp = path.stat().st_mtime_ns
    assert bench_value.write_splits(tmp_path, cases, 5) == (test, splits)
    assert path.stat().st_mtime_ns == stamp  # an identical split is left as it is
    path.write_text("[]")
    bench_value.write_splits(tmp_path, cases, 5)
    assert json.loads(path.read_text()) == splits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits_final.json"]  # no temporary file left
