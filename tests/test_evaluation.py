"""Known-answer tests for medflowseg_nn.evaluation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.evaluation import (dice, evaluate_case, evaluate_folder, hd95, label_key, normalized_surface_dice,
                                      surface_distances, volume_difference)

SHAPE = (40, 40, 40)


def sphere(center_vox, radius_mm=10.0, spacing=(1.0, 1.0, 1.0), shape=SHAPE) -> np.ndarray:
    """Ball of ``radius_mm`` (physical) centred at voxel ``center_vox`` on a grid with ``spacing`` (array order)."""
    grid = np.indices(shape, dtype=float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center_vox, spacing))
    return d2 <= radius_mm ** 2


def analytic_hd95(radius: float, shift: float) -> float:
    """95th percentile of the distance between two spheres' surfaces (area-uniform points, symmetric)."""
    cos_t = np.linspace(-1.0, 1.0, 200001)
    return float(np.percentile(np.abs(np.sqrt(radius ** 2 - 2 * radius * shift * cos_t + shift ** 2) - radius), 95))


def write_seg(path, arr: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0)) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, str(path))


def test_identical_masks():
    a = sphere((20, 20, 20))
    assert dice(a, a) == 1.0
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(a, a, (1, 1, 1), tolerance_mm=0.1) == 1.0
    assert volume_difference(a, a, (1, 1, 1)) == 0.0


def test_disjoint_masks():
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[2:10, 2:10, 2:10] = True
    b[30:38, 30:38, 30:38] = True
    assert dice(a, b) == 0.0
    assert hd95(a, b) >= 21 * math.sqrt(3) - 1e-9  # closest pair: corner (9, 9, 9) -> corner (30, 30, 30)
    assert normalized_surface_dice(a, b, tolerance_mm=5.0) == 0.0


def test_partial_overlap_dice():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:, :4] = True  # 40 voxels
    b[:, 2:8] = True  # 60 voxels, 20 shared
    assert dice(a, b) == pytest.approx(2 * 20 / 100)


def test_shifted_sphere_isotropic():
    a, b = sphere((20, 20, 20)), sphere((23, 20, 20))
    expected = analytic_hd95(10.0, 3.0)
    assert abs(hd95(a, b, (1, 1, 1)) - expected) <= 1.0
    assert abs(hd95(a, b, (1, 1, 1)) - 3.0) <= 1.0
    d_ab, d_ba = surface_distances(a, b, (1, 1, 1))
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(3.0)  # Hausdorff = shift
    assert hd95(a, b, (1, 1, 1)) == hd95(b, a, (1, 1, 1))  # symmetric convention


def test_shifted_sphere_respects_spacing():
    spacing = (2.0, 1.0, 1.0)
    a, b = sphere((20, 20, 20), spacing=spacing), sphere((23, 20, 20), spacing=spacing)  # shift 3 voxels = 6 mm
    value = hd95(a, b, spacing)
    assert abs(value - analytic_hd95(10.0, 6.0)) <= 2.0  # within one voxel along the shifted axis
    assert abs(value - 6.0) <= 2.0
    assert value > hd95(a, b, (1.0, 1.0, 1.0)) + 1.5  # ignoring the spacing would give a clearly smaller value
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(6.0)


def test_nsd_tolerance_vs_shift():
    a, b = sphere((20, 20, 20)), sphere((23, 20, 20))
    small = normalized_surface_dice(a, b, (1, 1, 1), tolerance_mm=1.0)
    large = normalized_surface_dice(a, b, (1, 1, 1), tolerance_mm=4.0)
    assert large == 1.0
    assert 0.0 < small < 0.6
    assert normalized_surface_dice(a, b, (1, 1, 1), tolerance_mm=3.0) == 1.0  # max distance == shift


def test_volume_difference():
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[:10, :10, :10] = True
    b[:10, :10, :5] = True
    assert volume_difference(a, b, (2.0, 1.0, 0.5)) == pytest.approx(-500 * 1.0)
    assert volume_difference(a, b, relative=True) == pytest.approx(-0.5)


def test_empty_conventions():
    empty, full = np.zeros(SHAPE, bool), sphere((20, 20, 20), radius_mm=5)
    assert dice(empty, empty) == 1.0
    assert hd95(empty, empty) == 0.0
    assert normalized_surface_dice(empty, empty) == 1.0
    assert volume_difference(empty, empty) == 0.0
    for ref, pred in ((empty, full), (full, empty)):
        assert dice(ref, pred) == 0.0
        assert hd95(ref, pred) == math.inf
        assert normalized_surface_dice(ref, pred, tolerance_mm=100.0) == 0.0
    assert volume_difference(empty, full) == full.sum()
    assert volume_difference(empty, full, relative=True) == math.inf
    d_ref, d_pred = surface_distances(full, empty)
    assert d_pred.size == 0 and d_ref.size > 0 and np.isinf(d_ref).all()


def test_mask_touching_border_and_2d():
    a, b = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    yy, xx = np.indices((30, 30))
    a[(yy - 15) ** 2 + (xx - 12) ** 2 <= 64] = True
    b[(yy - 15) ** 2 + (xx - 14) ** 2 <= 64] = True
    assert abs(hd95(a, b, (1.0, 1.0)) - 2.0) <= 1.0
    assert hd95(a, b, (1.0, 0.5)) == pytest.approx(hd95(a, b, (1.0, 1.0)) / 2, abs=0.5)
    assert normalized_surface_dice(a, b, (1.0, 1.0), tolerance_mm=2.0) == 1.0
    full = np.ones((5, 5), bool)  # every voxel touches the border or is interior; the border counts as surface
    assert hd95(full, full) == 0.0 and dice(full, full) == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        surface_distances(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_label_key():
    assert label_key(3) == "3" and label_key(np.int64(2)) == "2"
    assert label_key((1, 2)) == "(1, 2)" and label_key([1]) == "(1,)"


def test_evaluate_case_spacing_order_and_regions(tmp_path):
    ref = sphere((20, 20, 20), spacing=(2, 1, 1)).astype(np.uint8)
    pred = sphere((23, 20, 20), spacing=(2, 1, 1)).astype(np.uint8)
    # label 2 = upper half of the ball; region (1, 2) is the whole ball
    ref[22:][ref[22:] == 1] = 2
    pred[25:][pred[25:] == 1] = 2
    write_seg(tmp_path / "ref.nii.gz", ref, spacing_xyz=(1, 1, 2))  # SimpleITK (x, y, z): z spacing 2 = array axis 0
    write_seg(tmp_path / "pred.nii.gz", pred, spacing_xyz=(1, 1, 2))
    res = evaluate_case(str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz"), [1, 2, (1, 2)], 1.0)
    m = res["metrics"]
    assert set(m) == {"1", "2", "(1, 2)"}
    whole_ref, whole_pred = ref > 0, pred > 0
    assert m["(1, 2)"]["Dice"] == pytest.approx(dice(whole_ref, whole_pred))
    assert m["(1, 2)"]["HD95"] == pytest.approx(hd95(whole_ref, whole_pred, (2, 1, 1)))
    assert abs(m["(1, 2)"]["HD95"] - 6.0) <= 2.0  # spacing was reversed correctly (z is array axis 0)
    assert m["1"]["Dice"] == pytest.approx(dice(ref == 1, pred == 1))
    assert m["(1, 2)"]["n_ref"] == int(whole_ref.sum()) and m["2"]["n_pred"] == int((pred == 2).sum())
    assert m["(1, 2)"]["VolumeDiff"] == pytest.approx(2.0 * (int(whole_pred.sum()) - int(whole_ref.sum())))


def test_evaluate_case_shape_mismatch_names_files(tmp_path):
    write_seg(tmp_path / "a.nii.gz", np.zeros((4, 5, 6)))
    write_seg(tmp_path / "b.nii.gz", np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match=r"a\.nii\.gz.*b\.nii\.gz"):
        evaluate_case(str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), [1])


def _make_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    shape = (24, 24, 24)
    a = sphere((12, 12, 12), radius_mm=6, shape=shape).astype(np.uint8)
    b = sphere((13, 12, 12), radius_mm=6, shape=shape).astype(np.uint8)
    write_seg(ref_dir / "case_0.nii.gz", a)
    write_seg(pred_dir / "case_0.nii.gz", a)  # perfect
    write_seg(ref_dir / "case_1.nii.gz", a)
    write_seg(pred_dir / "case_1.nii.gz", b)  # shifted by 1 voxel
    write_seg(ref_dir / "case_2.nii.gz", a)
    write_seg(pred_dir / "case_2.nii.gz", np.zeros(shape))  # missed -> HD95 inf
    return ref_dir, pred_dir


def test_evaluate_folder_aggregation_and_json(tmp_path):
    ref_dir, pred_dir = _make_folders(tmp_path)
    out = tmp_path / "summary.json"
    res = evaluate_folder(str(ref_dir), str(pred_dir), output_file=str(out))
    assert list(res["mean"]) == ["1"]  # default labels: nonzero labels of the references
    per_case = {c["prediction_file"].rsplit("/", 1)[-1]: c["metrics"]["1"] for c in res["metric_per_case"]}
    assert per_case["case_0.nii.gz"]["Dice"] == 1.0 and per_case["case_0.nii.gz"]["HD95"] == 0.0
    assert per_case["case_2.nii.gz"]["HD95"] is None  # inf stored as null
    assert per_case["case_2.nii.gz"]["Dice"] == 0.0 and per_case["case_2.nii.gz"]["NSD"] == 0.0
    mean = res["mean"]["1"]
    assert mean["HD95_n_inf"] == 1
    assert mean["HD95"] == pytest.approx((0.0 + per_case["case_1.nii.gz"]["HD95"]) / 2)  # inf ignored
    assert mean["Dice"] == pytest.approx((1.0 + per_case["case_1.nii.gz"]["Dice"] + 0.0) / 3)
    assert res["median"]["1"]["Dice"] == pytest.approx(per_case["case_1.nii.gz"]["Dice"])
    assert res["foreground_mean"]["Dice"] == pytest.approx(mean["Dice"])
    assert json.loads(out.read_text()) == res  # strict JSON (allow_nan=False) round-trips
    json.dumps(res, allow_nan=False)


def test_evaluate_folder_errors(tmp_path):
    ref_dir, pred_dir = _make_folders(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_folder(str(tmp_path / "nope"), str(pred_dir))
    (ref_dir / "case_0.nii.gz").rename(ref_dir / "case_9.nii.gz")
    with pytest.raises(ValueError, match="case_0.nii.gz"):  # prediction without reference
        evaluate_folder(str(ref_dir), str(pred_dir))
    (pred_dir / "case_0.nii.gz").unlink()
    with pytest.raises(ValueError, match="case_9.nii.gz"):  # reference without prediction
        evaluate_folder(str(ref_dir), str(pred_dir))
    with pytest.raises(ValueError, match="no '\\*.mha' files"):
        evaluate_folder(str(ref_dir), str(pred_dir), file_ending=".mha")
