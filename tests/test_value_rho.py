"""benchmarks/value_rho.py: vectorised Spearman against scipy's, and the paired comparison on rows whose answer is
known (a flag that ranks the errors perfectly against one that is noise)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import value_rho  # noqa: E402


def test_spearman_rows_is_scipys_spearman_with_ties():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    u, e = rng.integers(0, 5, (6, 12)).astype(float), rng.random((6, 12))
    expected = [spearmanr(a, b).statistic for a, b in zip(u, e)]
    assert np.allclose(value_rho.spearman_rows(u, e), expected)


def rows(seed: int, rng) -> list[dict]:
    dice = rng.uniform(0.5, 0.95, 40)
    cases = {f"c{i:02d}": float(d) for i, d in enumerate(dice)}
    good = {c: {"dice_fg": d, "entropy_roi": 1 - d, "entropy_all": (1 - d) ** 2, "expected_dice_error": 2 - d}
            for c, d in cases.items()}  # every flag a rising function of the error: ρ = 1
    noise = {c: {"dice_fg": d, "entropy_roi": rng.random(), "entropy_all": rng.random(),
                 "expected_dice_error": rng.random()} for c, d in cases.items()}
    return [{"seed": seed, "model": "ours packed, members T + map (the product)", "per_case": good},
            {"seed": seed, "model": "nnU-Net single, T + map", "per_case": noise},
            {"seed": seed, "model": "nnU-Net 3-fold ensemble, members T + map", "per_case": noise}]


def test_a_perfect_flag_beats_noise_on_every_flag_and_the_interval_says_so(tmp_path, capsys):
    from medflowseg_nn.calibration import spearman
    rng = np.random.default_rng(1)
    results = [{"rows": rows(0, rng) + rows(1, rng)}]
    pairs = value_rho.paired_rows(results, "(the product)", "nnU-Net single")
    assert list(pairs) == [0, 1]
    for flag, key in value_rho.FLAGS.items():
        r = value_rho.compare(pairs, flag, n_boot=500)
        assert [v["ours"] for v in r["per_seed"].values()] == pytest.approx([1.0, 1.0])
        base = pairs[1][1]["per_case"]
        assert r["per_seed"][1]["baseline"] == pytest.approx(
            spearman([base[c][key] for c in base], [1 - base[c]["dice_fg"] for c in base]).rho)
        assert r["mean_difference"] > 0.5 and r["ci95"][0] > 0.3 and r["p_not_higher"] == 0.0
    (tmp_path / "a.json").write_text(json.dumps(results[0]))
    assert value_rho.main([str(tmp_path / "a.json"), "--n_boot", "100", "--out", str(tmp_path / "o.json")]) == 0
    assert "| rho_ede | 0 / 1 | 1.00 / 1.00 |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "o.json").read_text())["flags"]) == 3


def test_rows_that_do_not_pair_are_refused():
    rng = np.random.default_rng(2)
    with pytest.raises(SystemExit, match="no seed"):
        value_rho.paired_rows([{"rows": rows(0, rng)}], "(the product)", "Rotterdam")
    two = rows(0, rng)
    two[1]["per_case"] = dict(list(two[1]["per_case"].items())[:30])
    with pytest.raises(SystemExit, match="same test cases"):
        value_rho.compare(value_rho.paired_rows([{"rows": two}], "(the product)", "nnU-Net single"), "rho", 10)
