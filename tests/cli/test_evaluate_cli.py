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


def _write_probabilities(pred_dir, prob_dir, conf: float = 0.8) -> None:
    """CASE.npz with ``conf`` on each predicted label (3 classes), in the SimpleITK array layout of the segmentation."""
    prob_dir.mkdir(exist_ok=True)
    for f in sorted(pred_dir.glob("*.nii.gz")):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.int64)
        onehot = np.moveaxis(np.eye(3)[seg], -1, 0)
        probs = (onehot * conf + (1 - onehot) * (1 - conf) / 2).astype(np.float32)
        np.savez_compressed(prob_dir / f.name.replace(".nii.gz", ".npz"), probabilities=probs)


def test_cli_probabilities_adds_calibration(folders, tmp_path, capsys):
    from medflowseg_nn.calibration import calibration_metrics

    ref_dir, pred_dir = folders
    prob_dir = tmp_path / "probs"
    _write_probabilities(pred_dir, prob_dir)
    out = tmp_path / "summary.json"
    rc = main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--probabilities", str(prob_dir), "--roi_dilation", "2",
               "-o", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert set(summary) == {"metric_per_case", "mean", "median", "foreground_mean", "calibration"}
    c = summary["calibration"]
    assert c["n_cases"] == 3 and c["settings"]["roi_dilation"] == 2
    assert c["settings"]["dice_source"] == "segmentation files"
    # pooled = the metric of all voxels of the three cases together (computed here directly)
    refs = [sitk.GetArrayFromImage(sitk.ReadImage(str(ref_dir / f"case_{i}.nii.gz"))).astype(np.int64)
            for i in range(3)]
    probs = [np.load(prob_dir / f"case_{i}.npz")["probabilities"] for i in range(3)]
    direct = calibration_metrics(np.concatenate([p.reshape(3, -1) for p in probs], 1),
                                 np.concatenate([r.ravel() for r in refs]))
    for key in ("ece", "brier", "nll", "aurc", "accuracy"):
        assert c["dataset"]["all"][key] == pytest.approx(getattr(direct, key), rel=1e-9)
    assert c["dataset"]["roi"]["n_voxels"] < c["dataset"]["all"]["n_voxels"]
    case_1 = next(m for m in summary["metric_per_case"] if m["prediction_file"].endswith("case_1.nii.gz"))
    fg = np.mean([case_1["metrics"][k]["Dice"] for k in ("1", "2")])
    assert c["per_case"]["case_1"]["dice_fg"] == pytest.approx(fg)
    printed = capsys.readouterr().out
    assert "fg mean" in printed and "ECE" in printed and "AURC" in printed and "Spearman" in printed
    diagram = tmp_path / "summary_reliability.png"  # drawn next to the summary
    assert f"reliability diagram written to {diagram}" in printed
    import matplotlib.image
    assert matplotlib.image.imread(str(diagram)).shape[:2] == (560, 840)  # two voxel sets side by side


def test_cli_without_probabilities_prints_no_calibration(folders, capsys):
    ref_dir, pred_dir = folders
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir)]) == 0
    assert "ECE" not in capsys.readouterr().out
    assert "calibration" not in json.loads((pred_dir / "summary_mfs.json").read_text())
    assert not (pred_dir / "summary_mfs_reliability.png").exists()


@pytest.mark.parametrize("problem", ["missing", "no_key", "shape"])
def test_cli_probability_errors_return_2_naming_the_file(folders, tmp_path, capsys, problem):
    ref_dir, pred_dir = folders
    prob_dir = tmp_path / "probs"
    _write_probabilities(pred_dir, prob_dir)
    if problem == "no_key":
        np.savez(prob_dir / "case_1.npz", logits=np.zeros(3))
    elif problem == "shape":
        np.savez(prob_dir / "case_1.npz", probabilities=np.full((3, 24, 24, 20), 1 / 3, np.float32))
    arg = str(tmp_path / "nope") if problem == "missing" else str(prob_dir)
    out = tmp_path / "s.json"
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--probabilities", arg, "-o", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # tqdm also writes there
    assert len(errors) == 1 and errors[0].startswith("mfs_evaluate: error: ")
    assert ("nope" if problem == "missing" else "case_1.npz") in errors[0]
    assert not out.exists()
