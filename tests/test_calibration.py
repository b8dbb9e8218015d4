"""Known-answer tests of :mod:`medflowseg_nn.calibration` and :mod:`medflowseg_nn.calibration_folder`."""
from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn import calibration as cal
from medflowseg_nn.calibration import CalibrationAccumulator, calibration_metrics
from medflowseg_nn.calibration_folder import evaluate_probability_folder, format_calibration_table, read_reference
from medflowseg_nn.errors import UserError


def _two_class(p1: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p1, p1])


def _brute_aurc(conf: np.ndarray, err: np.ndarray) -> float:
    """Mean over all orders of the tied voxels of (1/n) sum_k errors(top k)/k."""
    n, values = conf.size, []
    for perm in itertools.permutations(range(n)):
        order = sorted(range(n), key=lambda i: (-conf[i], perm.index(i)))
        values.append(np.mean(np.cumsum(err[order]) / np.arange(1, n + 1)))
    return float(np.mean(values))


def test_module_imports_no_nnunet():
    code = ("import sys; sys.modules['nnunetv2'] = None; import medflowseg_nn.calibration, "
            "medflowseg_nn.calibration_folder")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_perfectly_calibrated_predictor_has_ece_near_zero():
    """Labels drawn from the predicted probabilities: ECE -> 0 as n grows. With 300 000 voxels the sampling noise of
    the 15 bin accuracies gives ECE ~ 0.002; tolerance 0.01. Brier -> E[1 - sum_c p_c^2]."""
    rng = np.random.default_rng(0)
    n, c = 300_000, 3
    p = rng.dirichlet([0.3, 0.3, 0.3], size=n).T  # [C, N], many confident voxels
    y = (rng.random(n)[None] > np.cumsum(p, axis=0)).sum(0)  # inverse-CDF draw from p
    r = calibration_metrics(p, y)
    assert r.ece < 0.01
    assert r.brier == pytest.approx(float(np.mean(1 - (p ** 2).sum(0))), abs=0.005)
    assert r.n_voxels == n and sum(r.bin_count) == n


def test_constant_overconfident_predictor_known_answers():
    """p(class 1) = 0.9 everywhere, 60 % of the labels are 1: ECE = |0.6 - 0.9| = 0.3; Brier = 0.6 (0.1^2 + 0.1^2) +
    0.4 (0.9^2 + 0.9^2) = 0.66; NLL = -(0.6 ln 0.9 + 0.4 ln 0.1); all confidences tie, so AURC = error rate 0.4."""
    n = 1000
    y = np.zeros(n, np.int64)
    y[:600] = 1
    r = calibration_metrics(_two_class(np.full(n, 0.9)), y)
    assert r.ece == pytest.approx(0.3, abs=1e-9)
    assert r.accuracy == pytest.approx(0.6) and r.mean_confidence == pytest.approx(0.9)
    assert r.brier == pytest.approx(0.66, abs=1e-12)
    assert r.nll == pytest.approx(-(0.6 * math.log(0.9) + 0.4 * math.log(0.1)), abs=1e-12)
    assert r.aurc == pytest.approx(0.4, abs=1e-12)
    ok, e = 600, 400  # optimal: 600 correct first, then the 400 errors
    assert r.aurc_optimal == pytest.approx(sum((k - ok) / k for k in range(ok + 1, n + 1)) / n, abs=1e-12)
    assert r.bin_count[13] == n  # 0.9 * 15 = 13.5 -> bin [13/15, 14/15)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_brier_nll_entropy_closed_forms(c):
    rng = np.random.default_rng(c)
    y = rng.integers(0, c, size=(4, 5, 6))
    onehot = np.moveaxis(np.eye(c)[y], -1, 0)
    r = calibration_metrics(onehot, y)
    assert (r.ece, r.brier, r.nll, r.aurc, r.accuracy, r.mean_entropy) == (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    u = calibration_metrics(np.full((c, 4, 5, 6), 1.0 / c), y)
    assert u.brier == pytest.approx(1 - 1 / c) and u.nll == pytest.approx(math.log(c))
    assert u.mean_entropy == pytest.approx(math.log(c))
    wrong = calibration_metrics(np.moveaxis(np.eye(c)[(y + 1) % c], -1, 0), y)
    assert wrong.brier == pytest.approx(2.0) and wrong.nll == pytest.approx(-math.log(cal.EPS))
    assert wrong.ece == pytest.approx(1.0) and wrong.aurc == pytest.approx(1.0)


def test_aurc_perfect_ranking_vs_random():
    rng = np.random.default_rng(1)
    n, e = 20_000, 3_000
    err = np.zeros(n, bool)
    err[:e] = True
    conf_perfect = np.where(err, rng.uniform(0.5, 0.6, n), rng.uniform(0.7, 1.0, n))  # all errors least confident
    y = np.ones(n, np.int64)
    y[err] = 0  # prediction is class 1 (conf > 0.5), errors are those whose label is 0
    perfect = calibration_metrics(_two_class(conf_perfect), y)
    assert perfect.aurc == pytest.approx(perfect.aurc_optimal, abs=1e-12)
    random = calibration_metrics(_two_class(rng.permutation(conf_perfect)), y)
    assert random.aurc == pytest.approx(e / n, abs=0.01)  # confidence independent of error: risk ~ error rate
    assert perfect.aurc < 0.05 < random.aurc


def test_aurc_ties_are_the_expectation_over_random_orders():
    conf = np.array([0.9, 0.9, 0.8, 0.8, 0.8, 0.55, 0.7])
    y = np.array([0, 1, 1, 0, 0, 1, 1])  # predicted class 1 everywhere
    r = calibration_metrics(_two_class(conf), y)
    assert r.aurc == pytest.approx(_brute_aurc(conf, (y != 1).astype(float)), abs=1e-12)
    perm = np.random.default_rng(0).permutation(conf.size)
    assert calibration_metrics(_two_class(conf[perm]), y[perm]).aurc == pytest.approx(r.aurc, abs=1e-15)


def test_harmonic_difference_large_arguments():
    a = np.array([0, 3, 99, 150, 10_000, 10 ** 9])
    b = a + np.array([5, 0, 7, 1, 12_345, 3])
    exact = [math.fsum(1.0 / j for j in range(int(x) + 1, int(z) + 1)) for x, z in zip(a, b)]
    np.testing.assert_allclose(cal.harmonic_difference(a, b), exact, rtol=1e-12, atol=0)


def test_pooling_masking_and_chunking_are_exact(monkeypatch):
    rng = np.random.default_rng(2)
    p = rng.dirichlet([0.5] * 3, size=5000).T.astype(np.float32)
    y = rng.integers(0, 3, 5000)
    whole = calibration_metrics(p, y)
    acc = CalibrationAccumulator()
    for part in np.array_split(np.arange(5000), 3):
        one = CalibrationAccumulator()
        one.update(p[:, part], y[part])
        acc.merge(one)
    pooled = acc.result()
    monkeypatch.setattr(cal, "CHUNK", 777)
    chunked = calibration_metrics(p, y)
    for r in (pooled, chunked):
        for k in ("ece", "brier", "nll", "aurc", "aurc_optimal", "accuracy", "mean_entropy"):
            assert getattr(r, k) == pytest.approx(getattr(whole, k), rel=1e-12, abs=1e-15), k
        assert r.bin_count == whole.bin_count
    mask = rng.random(5000) < 0.3
    assert calibration_metrics(p, y, mask).to_dict() == calibration_metrics(p[:, mask], y[mask]).to_dict()
    empty = calibration_metrics(p, y, np.zeros(5000, bool))
    assert empty.n_voxels == 0 and math.isnan(empty.ece) and empty.to_dict()["ece"] is None


def test_input_checks():
    with pytest.raises(ValueError, match="shape mismatch"):
        calibration_metrics(np.full((2, 3, 4), 0.5), np.zeros((4, 3), int))
    with pytest.raises(ValueError, match="labels must lie"):
        calibration_metrics(np.full((2, 3), 0.5), np.array([0, 1, 2]))


def test_reference_roi_is_a_dilated_cube():
    ref = np.zeros((11, 12, 13), np.uint8)
    ref[5, 6, 6] = 2
    roi = cal.reference_roi(ref, 2)
    assert roi.sum() == 5 ** 3 and roi[3:8, 4:9, 4:9].all()
    assert (cal.reference_roi(ref, 0) == (ref > 0)).all()
    assert not cal.reference_roi(np.zeros((4, 4), int), 3).any()
    ref2 = np.zeros((9, 9), int)
    ref2[0, 0] = 1  # the border clips the square
    assert cal.reference_roi(ref2, 3).sum() == 16


def test_spearman_sign():
    u = [0.1, 0.2, 0.3, 0.5, 0.9]
    assert cal.spearman(u, [0.0, 0.1, 0.2, 0.4, 0.5]).rho == pytest.approx(1.0)
    assert cal.spearman(u, [0.5, 0.4, 0.3, 0.1, 0.0]).rho == pytest.approx(-1.0)
    assert math.isnan(cal.spearman(u[:2], [0.1, 0.2]).rho)
    assert math.isnan(cal.spearman(u, [0.3] * 5).rho) and cal.spearman(u, [0.3] * 5).n == 5


# ---- folder level: axes and user errors -----------------------------------------------------------------------
def _write_case(folder, case: str, ref: np.ndarray, probs: np.ndarray | None, spacing_xyz=(0.7, 1.1, 2.5)) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "probs").mkdir(exist_ok=True)
    img = sitk.GetImageFromArray(ref.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(folder / f"{case}.nii.gz"))
    if probs is not None:
        np.savez_compressed(folder / "probs" / f"{case}.npz", probabilities=probs)


def _onehot(ref: np.ndarray, c: int, conf: float = 1.0) -> np.ndarray:
    oh = np.moveaxis(np.eye(c)[ref], -1, 0)
    return (oh * conf + (1 - oh) * (1 - conf) / (c - 1)).astype(np.float32)


def test_axes_match_nnunet_reader_and_writer(tmp_path):
    """nnU-Net writes CASE.npz in the layout of the segmentation array it passes to its SimpleITK writer; that array
    comes back unchanged from nnU-Net's reader and from our reader (evaluation's convention), on a non-cubic,
    anisotropic image. A transposed probability array is rejected."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    rng = np.random.default_rng(3)
    seg = rng.integers(0, 3, size=(5, 7, 9)).astype(np.uint8)
    img = sitk.GetImageFromArray(seg)
    img.SetSpacing((0.7, 1.1, 2.5))
    sitk.WriteImage(img, str(tmp_path / "img_0000.nii.gz"))
    _, props = SimpleITKIO().read_images([str(tmp_path / "img_0000.nii.gz")])
    SimpleITKIO().write_seg(seg, str(tmp_path / "case.nii.gz"), props)
    nn_seg, nn_props = SimpleITKIO().read_seg(str(tmp_path / "case.nii.gz"))
    assert (nn_seg[0] == seg).all() and (read_reference(str(tmp_path / "case.nii.gz")) == seg).all()
    assert list(nn_props["spacing"]) == pytest.approx([2.5, 1.1, 0.7])  # array order (z, y, x)
    (tmp_path / "probs").mkdir()
    np.savez(tmp_path / "probs" / "case.npz", probabilities=_onehot(seg.astype(np.int64), 3))
    r = evaluate_probability_folder(str(tmp_path), str(tmp_path / "probs"))
    assert r["dataset"]["all"]["accuracy"] == 1.0 and r["per_case"]["case"]["dice_fg"] == 1.0
    np.savez(tmp_path / "probs" / "case.npz", probabilities=_onehot(seg.astype(np.int64), 3).transpose(0, 3, 2, 1))
    with pytest.raises(UserError, match="case.npz: probabilities have spatial shape"):
        evaluate_probability_folder(str(tmp_path), str(tmp_path / "probs"))


def test_folder_pools_cases_and_reports_spearman(tmp_path):
    for i in range(4):
        ref = np.zeros((8, 10, 12), np.int64)
        ref[2:6, 3:7, 3:3 + 2 * i + 2] = 1
        _write_case(tmp_path, f"c{i}", ref, _onehot(ref, 2, conf=0.6 + 0.1 * i))
    r = evaluate_probability_folder(str(tmp_path), str(tmp_path / "probs"), roi_dilation=1)
    assert r["n_cases"] == 4 and set(r["per_case"]) == {"c0", "c1", "c2", "c3"}
    assert r["dataset"]["all"]["n_voxels"] == 4 * 8 * 10 * 12
    assert r["dataset"]["all"]["ece"] == pytest.approx(np.mean([0.4, 0.3, 0.2, 0.1]))  # accuracy 1 everywhere
    assert r["settings"]["dice_source"] == "argmax of probabilities"
    dice = {f"c{i}": d for i, d in enumerate([0.9, 0.8, 0.7, 0.6])}  # least confident = best: rho = -1
    r2 = evaluate_probability_folder(str(tmp_path), str(tmp_path / "probs"), dice, roi_dilation=1)
    assert r2["spearman"]["all"]["rho"] == pytest.approx(-1.0) and r2["spearman"]["roi"]["n"] == 4
    ede = [r2["per_case"][f"c{i}"]["expected_dice_error"] for i in range(4)]
    assert ede == sorted(ede, reverse=True) and r2["spearman"]["expected_dice_error"]["rho"] == pytest.approx(-1.0)
    assert "expected Dice error" in format_calibration_table(r2)
    with pytest.raises(UserError, match="differ: c3"):
        evaluate_probability_folder(str(tmp_path), str(tmp_path / "probs"), {k: dice[k] for k in ("c0", "c1", "c2")})


@pytest.mark.parametrize("problem", ["missing", "no_key", "not_npz", "logits", "label", "no_ref", "empty"])
def test_folder_user_errors_name_the_file(tmp_path, problem):
    ref = np.zeros((4, 5, 6), np.int64)
    ref[1:3, 1:3, 1:3] = 1
    _write_case(tmp_path, "a", ref, _onehot(ref, 2))
    probs = tmp_path / "probs"
    expected = {"missing": "probabilities folder does not exist", "no_key": "a.npz has no 'probabilities'",
                "not_npz": "cannot read", "logits": "do not sum to 1", "label": "has label 2",
                "no_ref": "no reference b.nii.gz", "empty": "no CASE.npz files"}[problem]
    prob_dir = str(probs)
    if problem == "missing":
        prob_dir = str(tmp_path / "nope")
    elif problem == "no_key":
        np.savez(probs / "a.npz", softmax=_onehot(ref, 2))
    elif problem == "not_npz":
        (probs / "a.npz").write_bytes(b"not a zip")
    elif problem == "logits":
        np.savez(probs / "a.npz", probabilities=np.full((2, 4, 5, 6), 3.0, np.float32))
    elif problem == "label":
        ref[0, 0, 0] = 2
        _write_case(tmp_path, "a", ref, None)
    elif problem == "no_ref":
        np.savez(probs / "b.npz", probabilities=_onehot(ref, 2))
    elif problem == "empty":
        (probs / "a.npz").unlink()
    with pytest.raises(UserError, match=expected) as info:
        evaluate_probability_folder(str(tmp_path), prob_dir)
    assert len(str(info.value).splitlines()) == 1


def test_expected_dice_error_known_answers():
    hard = np.zeros((3, 4, 5))
    hard[0], hard[1, :2], hard[0, :2] = 1, 1, 0  # label 1 on two rows, label 2 absent
    assert cal.expected_dice_error(hard, [1, 2]) == pytest.approx(0.0)
    soft = np.zeros((2, 10))
    soft[1, :4], soft[0, :4] = 0.6, 0.4  # 4 voxels of label 1 at 0.6
    soft[1, 4:], soft[0, 4:] = 0.1, 0.9  # 6 background voxels at 0.1
    # (2 * 4 * 0.6 + 1) / (4 * 0.6 + 6 * 0.1 + 4 + 1) = 5.8 / 8
    assert cal.expected_dice_error(soft, [1]) == pytest.approx(1 - 5.8 / 8)
    sharper = soft.copy()
    sharper[1, :4], sharper[0, :4] = 0.9, 0.1
    assert cal.expected_dice_error(sharper, [1]) < cal.expected_dice_error(soft, [1])
