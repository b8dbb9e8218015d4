"""benchmarks/common.py's markdown table: the cells every benchmark prints."""
from __future__ import annotations

import sys

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from common import markdown_table  # noqa: E402


def test_markdown_table_formats_floats_and_marks_undefined_cells():
    rows = [{"run": "a", "Dice": 0.81234, "rho": None, "s": 123.45}, {"run": "b", "Dice": 0.5}]
    lines = markdown_table(rows, ["run", "Dice", "rho", "s"]).splitlines()
    assert lines[0] == "| run | Dice | rho | s |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a | 0.812 | — | 123.5 |"  # None: undefined (e.g. rho over < 3 cases), not "None"
    assert lines[3] == "| b | 0.500 |  |  |"  # a column the row lacks stays empty
