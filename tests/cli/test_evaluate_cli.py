"""Tests for the ``mfs_evaluate`` command line interface (run in-process)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli.evaluate import main

SHAPE = (20, 24, 24)


def _write(path, arr: np.ndarray, spacing_xyz=(1.0, 1.0, 1.5)) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    """Three cases with labels 1 and 2 (all non-empty in both reference and prediction)."""
    rng = np.random.default_rng(0)
    ref_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    zz, yy, xx = np.indices(SHAPE)
    for i in range(3):
        ref = np.zeros(SHAPE, np.uint8)
        ref[(zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 36] = 1
        ref[3:7, 4:10, 4:10 + i] = 2
        pred = ref.copy()
        pred[np.roll(ref == 1, i, axis=2)] = 1  # grow label 1 along x
        flip = rng.random(SHAPE) < 0.05
        pred[flip & (ref == 2)] = 0  # punch holes into label 2
        _write(ref_dir / f"case_{i}.nii.gz", ref)
        _write(pred_dir / f"case_{i}.nii.gz", pred)
    return ref_dir, pred_dir


def test_cli_writes_default_json(folders, capsys):
    ref_dir, pred_dir = folders
    rc = main(["-ref", str(ref_dir), "-pred", str(pred_dir)])
    assert rc == 0
    summary = json.loads((pred_dir / "summary_mfs.json").read_text())
    assert set(summary) == {"metric_per_case", "mean", "median", "foreground_mean"}
    assert set(summary["mean"]) == {"1", "2"}
    assert len(summary["metric_per_case"]) == 3
    for key in ("Dice", "HD95", "NSD", "VolumeDiff", "n_ref", "n_pred"):
        assert key in summary["mean"]["1"]
    assert summary["metric_per_case"][0]["metrics"]["1"]["Dice"] == 1.0
    out = capsys.readouterr().out
    assert "fg mean" in out and "Dice" in out and "HD95" in out and "NSD" in out


def test_cli_labels_regions_output_and_processes(folders, tmp_path):
    ref_dir, pred_dir = folders
    out = tmp_path / "sub" / "s.json"
    rc = main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "2", "--regions", "1,2", "(1)",
               "-o", str(out), "--tolerance", "2", "-np", "2"])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert set(summary["mean"]) == {"2", "(1, 2)", "(1,)"}
    case_0 = next(c for c in summary["metric_per_case"] if c["prediction_file"].endswith("case_0.nii.gz"))
    assert case_0["metrics"]["(1,)"]["Dice"] == 1.0 and case_0["metrics"]["(1,)"]["NSD"] == 1.0
    assert not (pred_dir / "summary_mfs.json").exists()


def test_cli_missing_folder_returns_2(tmp_path, capsys):
    rc = main(["-ref", str(tmp_path / "missing"), "-pred", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1


def test_cli_no_matching_files_returns_2(folders, capsys):
    ref_dir, pred_dir = folders
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--file_ending", ".mha"]) == 2
    assert "no '*.mha' files" in capsys.readouterr().err


def test_cli_bad_arguments_return_2(folders):
    ref_dir, pred_dir = folders
    assert main(["-ref", str(ref_dir)]) == 2
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--regions", "1,x"]) == 2
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-np", "0"]) == 2


def test_dice_matches_nnunet(folders, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref_dir, pred_dir = folders
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "-l", "1", "2", "--regions", "1,2"]) == 0
    ours = json.loads((pred_dir / "summary_mfs.json").read_text())
    theirs = compute_metrics_on_folder(str(ref_dir), str(pred_dir), None, SimpleITKIO(), ".nii.gz",
                                       [1, 2, (1, 2)], num_processes=1)
    theirs_by_case = {os.path.basename(c["prediction_file"]): c["metrics"] for c in theirs["metric_per_case"]}
    for case in ours["metric_per_case"]:
        ref_metrics = theirs_by_case[os.path.basename(case["prediction_file"])]
        for label, key in ((1, "1"), (2, "2"), ((1, 2), "(1, 2)")):
            assert case["metrics"][key]["Dice"] == pytest.approx(ref_metrics[label]["Dice"], abs=1e-12)
            assert case["metrics"][key]["n_ref"] == ref_metrics[label]["n_ref"]
            assert case["metrics"][key]["n_pred"] == ref_metrics[label]["n_pred"]
    for label, key in ((1, "1"), (2, "2"), ((1, 2), "(1, 2)")):
        assert ours["mean"][key]["Dice"] == pytest.approx(theirs["mean"][label]["Dice"], abs=1e-12)
    assert ours["foreground_mean"]["Dice"] == pytest.approx(theirs["foreground_mean"]["Dice"], abs=1e-12)
