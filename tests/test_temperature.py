"""Temperature scaling: closed-form behaviour and recovery of a known temperature."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medflowseg_nn.errors import UserError
from medflowseg_nn.recalibration import TopLabelMap, apply_top_label_map_np, fit_top_label_map
from medflowseg_nn.temperature import (FoldCalibration, apply_temperature, fit_calibration_on_folder,
                                       fit_temperature, load_calibration, save_temperature)


def softmax(z: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_apply_is_softmax_of_scaled_log_probabilities_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 8, 9)) * 3
    p = softmax(z)
    assert np.allclose(apply_temperature(p, 1.0), p, atol=1e-6)
    assert np.allclose(apply_temperature(p, 2.0), softmax(z / 2), atol=1e-6)
    assert np.allclose(apply_temperature(p, 0.5), softmax(z / 0.5), atol=1e-5)
    assert (apply_temperature(p, 3.0).argmax(0) == p.argmax(0)).all()
    assert np.allclose(apply_temperature(p, 3.0).sum(0), 1, atol=1e-6)
    with pytest.raises(UserError):
        apply_temperature(p, 0.0)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_of_the_label_distribution(true_t):
    """Labels drawn from softmax(z / T0), the model reports softmax(z): the NLL optimum is T0."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 200, 200)) * 2.0
    truth = softmax(z / true_t)
    u = rng.random(truth.shape[1:])
    labels = (u[None] > np.cumsum(truth, 0)).sum(0)
    fitted = fit_temperature([softmax(z)], [labels])
    assert fitted == pytest.approx(true_t, rel=0.05)


def test_fit_uses_only_the_masked_voxels():
    """Confident and right inside the mask, confident and wrong outside: only the inside may count."""
    p = np.zeros((2, 10, 10))
    p[0], p[1] = 0.9, 0.1
    labels = np.zeros((10, 10), int)
    labels[5:] = 1
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    sharpened = fit_temperature([p], [labels], [mask])
    softened = fit_temperature([p], [labels])  # half the voxels wrong at 0.9 confidence: T grows
    assert sharpened < 0.1  # all right: towards the sharpest allowed (the NLL flattens as T -> 0)
    assert softened > 5


def test_fit_rejects_bad_input():
    with pytest.raises(UserError, match="as many"):
        fit_temperature([], [])
    with pytest.raises(UserError, match="match"):
        fit_temperature([np.full((2, 3, 3), 0.5)], [np.zeros((4, 4), int)])
    with pytest.raises(UserError, match="no voxel"):
        fit_temperature([np.full((2, 3, 3), 0.5)], [np.zeros((3, 3), int)], [np.zeros((3, 3), bool)])


def test_save_and_load(tmp_path):
    assert load_calibration(str(tmp_path)) is None
    path = save_temperature(str(tmp_path), 1.7, {"cases": 3})
    assert json.load(open(path)) == {"temperature": 1.7, "fitted_on": {"cases": 3}}
    assert load_calibration(str(tmp_path)) == FoldCalibration(1.7)
    mapped = TopLabelMap((0.5, 0.9), (0.6, 0.8))
    save_temperature(str(tmp_path), 1.7, {"cases": 3, "sampler": {"steps": 1}}, mapped)
    assert load_calibration(str(tmp_path), {"steps": 1}) == FoldCalibration(1.7, mapped)
    assert load_calibration(str(tmp_path), {"steps": 2}) is None  # fitted for other sampler settings
    (tmp_path / "temperature.json").write_text('{"temperature": 1, "top_label_map": {"confidence": [0.9, 0.5], '
                                               '"accuracy": [0.6, 0.8]}}')
    with pytest.raises(UserError, match="not a temperature file"):
        load_calibration(str(tmp_path))
    (tmp_path / "temperature.json").write_text('{"t": 1}')
    with pytest.raises(UserError, match="not a temperature file"):
        load_calibration(str(tmp_path))
    (tmp_path / "temperature.json").write_text('{"temperature": 100}')
    with pytest.raises(UserError, match="outside"):
        load_calibration(str(tmp_path))


def test_a_calibration_is_applied_only_to_the_checkpoint_whose_weights_it_was_fitted_on(tmp_path, caplog):
    save_temperature(str(tmp_path), 1.7, {"sampler": {"steps": 1}})  # names no checkpoint (older files)
    assert load_calibration(str(tmp_path), {"steps": 1}, "checkpoint_best.pth") == FoldCalibration(1.7)
    save_temperature(str(tmp_path), 1.7, {"sampler": {"steps": 1}, "checkpoint": "checkpoint_best.pth"})
    assert load_calibration(str(tmp_path), {"steps": 1}, "checkpoint_best.pth") == FoldCalibration(1.7)
    assert load_calibration(str(tmp_path), {"steps": 1}) == FoldCalibration(1.7)  # no checkpoint asked: taken
    with caplog.at_level("WARNING", logger="medflowseg_nn.temperature"):
        assert load_calibration(str(tmp_path), {"steps": 1}, "checkpoint_final.pth") is None
    assert "fitted on the weights of checkpoint_best.pth, not checkpoint_final.pth" in caplog.text

def test_fit_on_a_folder_of_npz_and_references(tmp_path):
    import SimpleITK as sitk
    rng = np.random.default_rng(2)
    (tmp_path / "probs").mkdir()
    (tmp_path / "refs").mkdir()
    direct_p, direct_y, direct_m = [], [], []
    for i in range(2):
        z = rng.normal(size=(2, 12, 14, 10)) * 3
        ref = (rng.random((12, 14, 10)) < softmax(z / 2.0)[1]).astype(np.uint8)
        np.savez(tmp_path / "probs" / f"c{i}.npz", probabilities=softmax(z).astype(np.float32))
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(tmp_path / "refs" / f"c{i}.nii.gz"))
        direct_p.append(softmax(z).astype(np.float32))
        direct_y.append(ref.astype(np.int64))
        direct_m.append(np.ones(ref.shape, bool))  # the dilated ROI of a dense random reference is everything
    fitted, info = fit_calibration_on_folder(str(tmp_path / "probs"), str(tmp_path / "refs"), roi_dilation=3)
    t = fitted.temperature
    assert info["cases"] == ["c0", "c1"] and t > 1.3  # over-confident by construction (labels from z / 2)
    assert t == pytest.approx(fit_temperature(direct_p, direct_y, direct_m), rel=1e-6)
    tempered = [apply_temperature(p, t) for p in direct_p]
    assert fitted.top_label_map == fit_top_label_map(tempered, direct_y, direct_m)  # after T, on the same voxels
    np.testing.assert_allclose(fitted.probabilities(direct_p[0]), apply_top_label_map_np(tempered[0],
                                                                                         fitted.top_label_map))
    assert fit_calibration_on_folder(str(tmp_path / "probs"), str(tmp_path / "refs"),
                                     top_label_map=False)[0] == FoldCalibration(t)
    with pytest.raises(UserError, match="no CASE.npz"):
        fit_calibration_on_folder(str(tmp_path / "refs"), str(tmp_path / "refs"))
