"""benchmarks/value_models.py's ``train_all``: which models a bench_value run trains, under which keys and budgets
(``--ensemble_epochs``: the fold-ensemble members at their own epochs, so one model can be trained for the
ensemble's total iterations and set beside it). ``train_or_load`` is replaced by a recorder: nothing trains."""
from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_value  # noqa: E402
import value_models  # noqa: E402


def _plan(monkeypatch, flags: list[str]) -> tuple[dict, list[tuple]]:
    calls: list[tuple] = []

    def record(method, fold, seed, args, plans, dataset_json):
        calls.append((method, fold, seed, args.epochs, args.budget_tag))
        return object(), 0.0

    monkeypatch.setattr(value_models, "train_or_load", record)
    args = bench_value.build_parser().parse_args(["-c", "2d", "--iterations_per_epoch", "100", "--batch_size", "32",
                                                  *flags])
    args.budget_tag = value_models.budget_tag(args)
    return value_models.train_all(args, {}, {}), calls


def test_default_members_share_the_fold0_single_model(monkeypatch):
    models, calls = _plan(monkeypatch, ["--epochs", "10", "--seeds", "0", "1", "--ours_ensemble_folds", "0", "1"])
    assert list(models) == ["nnunet_f0_s0", "nnunet_f0_s1", "nnunet_f1_s0", "nnunet_f2_s0",
                            "ours_f0_s0", "ours_f0_s1", "ours_f1_s0"]
    assert {c[3] for c in calls} == {10} and len(calls) == len(models)  # fold 0 of seed 0 is trained once
    assert value_models.member_key("nnunet", 0, bench_value.build_parser().parse_args(["--seeds", "3"])) == \
        "nnunet_f0_s3"


@pytest.mark.parametrize("members", [10, 30])
def test_ensemble_epochs_train_every_member_apart(monkeypatch, members):
    models, calls = _plan(monkeypatch, ["--epochs", "30", "--ensemble_epochs", str(members), "--seeds", "0", "1"])
    singles = [(m, 0, s, 30, "e30i100b32_2d") for m in ("nnunet", "ours") for s in (0, 1)]
    if members == 30:  # the same budget: the default layout, fold 0 shared
        assert calls == singles[:2] + [("nnunet", f, 0, 30, "e30i100b32_2d") for f in (1, 2)] + singles[2:]
        assert list(models)[2:4] == ["nnunet_f1_s0", "nnunet_f2_s0"]
    else:
        assert calls == singles[:2] + [("nnunet", f, 0, 10, "e10i100b32_2d") for f in (0, 1, 2)] + singles[2:]
        assert list(models)[2:5] == ["nnunet_members_f0_s0", "nnunet_members_f1_s0", "nnunet_members_f2_s0"]
    assert list(models)[-2:] == ["ours_f0_s0", "ours_f0_s1"]  # no ours ensemble asked for: its fold-0 models only
