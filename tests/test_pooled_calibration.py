"""The pooled cross-validation calibration (:mod:`medflowseg_nn.pooled_calibration`) on synthetic folds: the
known answer (the fit on all folds' cases at once), the own fits kept and restored, and the errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.calibration import reference_roi
from medflowseg_nn.errors import UserError
from medflowseg_nn.pooled_calibration import (OWN_FOLD_FILE, fit_pooled_calibration, restore_own_fold_calibration,
                                              write_pooled_calibration)
from medflowseg_nn.temperature import fit_calibration, load_calibration, save_temperature

SAMPLER = {"steps": 1}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def make_fold(root, fold: int, true_t: float, rng, sampler=SAMPLER, cases: int = 2):
    """``root/fold_F`` with ``validation/CASE.npz`` whose labels are drawn from ``softmax(z / true_t)`` (so the
    fold's cases want T = ``true_t``; dense labels: the ROI is every voxel), references in ``root/gt``, and an own
    ``temperature.json``."""
    folder, gt = root / f"fold_{fold}", root / "gt"
    (folder / "validation").mkdir(parents=True)
    gt.mkdir(exist_ok=True)
    probs, refs = [], []
    for i in range(cases):
        z = rng.normal(size=(3, 10, 12, 9)) * 3
        ref = (rng.random((10, 12, 9))[None] < np.cumsum(softmax(z / true_t), 0)).argmax(0).astype(np.uint8)
        np.savez(folder / "validation" / f"f{fold}c{i}.npz", probabilities=softmax(z).astype(np.float32))
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(gt / f"f{fold}c{i}.nii.gz"))
        probs.append(softmax(z).astype(np.float32))
        refs.append(ref.astype(np.int64))
    save_temperature(str(folder), 1.0 + fold, {"cases": [], "sampler": sampler})
    return folder, probs, refs


def test_the_pooled_fit_is_the_fit_on_every_fold_case_and_is_written_to_every_fold(tmp_path, caplog):
    rng = np.random.default_rng(0)
    folds = [make_fold(tmp_path, f, t, rng) for f, t in ((0, 1.5), (1, 2.5))]
    pooled, info = fit_pooled_calibration([str(f) for f, _, _ in folds], str(tmp_path / "gt"))
    probs = [p for _, ps, _ in folds for p in ps]
    refs = [r for _, _, rs in folds for r in rs]
    direct = fit_calibration(probs, refs, [reference_roi(r, 3) for r in refs])
    assert pooled.temperature == pytest.approx(direct.temperature, rel=1e-6)
    assert pooled.top_label_map == direct.top_label_map
    assert 1.5 < pooled.temperature < 2.5  # between what each fold's cases want
    assert info["cases"] == ["f0c0", "f0c1", "f1c0", "f1c1"] and info["sampler"] == SAMPLER
    assert len(info["pooled_folds"]) == 2

    own = [json.loads((f / "temperature.json").read_text()) for f, _, _ in folds]
    write_pooled_calibration([str(f) for f, _, _ in folds], pooled, info)
    for (folder, _, _), own_content in zip(folds, own):
        assert json.loads((folder / OWN_FOLD_FILE).read_text()) == own_content
        with caplog.at_level(logging.INFO, logger="medflowseg_nn.temperature"):
            assert load_calibration(str(folder), SAMPLER) == pooled  # what mfs_predict loads for these settings
        assert "the pooled validations of 2 folds" in caplog.text
    # a second pooled fit reads the kept own fits' sampler and keeps them as they were
    again, info_again = fit_pooled_calibration([str(f) for f, _, _ in folds], str(tmp_path / "gt"))
    write_pooled_calibration([str(f) for f, _, _ in folds], again, info_again)
    assert [json.loads((f / OWN_FOLD_FILE).read_text()) for f, _, _ in folds] == own
    assert restore_own_fold_calibration([str(f) for f, _, _ in folds]) == [str(f) for f, _, _ in folds]
    assert [json.loads((f / "temperature.json").read_text()) for f, _, _ in folds] == own
    assert not any((f / OWN_FOLD_FILE).exists() for f, _, _ in folds)
    assert restore_own_fold_calibration([str(f) for f, _, _ in folds]) == []  # nothing pooled: nothing to do
    # a fold validated and fitted again after pooling (mfs_train --val): the new own fit is the one kept
    write_pooled_calibration([str(f) for f, _, _ in folds], pooled, info)
    save_temperature(str(folds[0][0]), 1.25, {"cases": ["again"], "sampler": SAMPLER})
    refit = json.loads((folds[0][0] / "temperature.json").read_text())
    write_pooled_calibration([str(f) for f, _, _ in folds], pooled, info)
    assert json.loads((folds[0][0] / OWN_FOLD_FILE).read_text()) == refit
    assert json.loads((folds[1][0] / OWN_FOLD_FILE).read_text()) == own[1]


def test_errors_name_the_fold_and_the_fix(tmp_path):
    rng = np.random.default_rng(1)
    f0, _, _ = make_fold(tmp_path, 0, 1.5, rng)
    f1, _, _ = make_fold(tmp_path, 1, 1.5, rng, sampler={"steps": 2})
    gt = str(tmp_path / "gt")
    with pytest.raises(UserError, match="at least two"):
        fit_pooled_calibration([str(f0), str(f0)], gt)
    with pytest.raises(UserError, match="different sampler settings"):
        fit_pooled_calibration([str(f0), str(f1)], gt)
    save_temperature(str(f1), 2.0, {"cases": [], "sampler": SAMPLER, "checkpoint": "checkpoint_best.pth"})
    with pytest.raises(UserError, match="different checkpoints"):
        fit_pooled_calibration([str(f0), str(f1)], gt)
    save_temperature(str(f0), 2.0, {"cases": [], "sampler": SAMPLER, "checkpoint": "checkpoint_best.pth"})
    assert fit_pooled_calibration([str(f0), str(f1)], gt)[1]["checkpoint"] == "checkpoint_best.pth"  # carried on
    save_temperature(str(f1), 2.0, {"cases": [], "sampler": SAMPLER})
    save_temperature(str(f0), 2.0, {"cases": [], "sampler": SAMPLER})
    assert "checkpoint" not in fit_pooled_calibration([str(f0), str(f1)], gt)[1]  # none named: none claimed
    for npz in (f1 / "validation").glob("*.npz"):
        npz.unlink()
    with pytest.raises(UserError, match="--val --npz"):
        fit_pooled_calibration([str(f0), str(f1)], gt)
    (f1 / "temperature.json").unlink()
    with pytest.raises(UserError, match="has no temperature.json"):
        fit_pooled_calibration([str(f0), str(f1)], gt)
    from medflowseg_nn.recalibration import TopLabelMap
    save_temperature(str(f1), 1.0, {"cases": [], "sampler": SAMPLER}, member_maps=[TopLabelMap((0.5,), (0.7,))] * 2)
    with pytest.raises(UserError, match="packed ensemble calibrated member by member"):
        fit_pooled_calibration([str(f0), str(f1)], gt)
