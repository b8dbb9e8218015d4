"""benchmarks/value_few_step.py: the settings it runs (each with the path mean beside it) and the per-seed Dice
differences to one step it reports. Scoring is ``value_report.RunScores`` (tested with bench_value)."""
from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import value_few_step  # noqa: E402


def test_every_multistep_setting_has_its_path_mean_twin_and_one_step_comes_first():
    rows = {row: (solver, steps, mean) for row, solver, steps, mean in value_few_step.SETTINGS}
    assert value_few_step.SETTINGS[0] == ("1 step", "euler", 1, False)
    for row, (solver, steps, mean) in rows.items():
        if steps > 1 and not mean:
            assert rows[f"{row} path mean"] == (solver, steps, True)


def test_dice_differences_per_seed_mean_and_count():
    per_seed = {0: {"1 step": {"dice_fg": 0.80}, "Euler N=2": {"dice_fg": 0.81}},
                1: {"1 step": {"dice_fg": 0.82}, "Euler N=2": {"dice_fg": 0.815}}}
    table = value_few_step.dice_differences(per_seed)
    assert "| Euler N=2 | +0.0100 | -0.0050 | +0.0025 | 1/2 |" in table
    assert "| 1 step | +0.0000 | +0.0000 | +0.0000 | 2/2 |" in table


def test_settings_without_one_step_are_refused():
    with pytest.raises(SystemExit, match="1 step"):
        value_few_step.main(["--settings", "Euler N=2"])
