"""``mfs_ensemble``, ``mfs_determine_postprocessing`` and ``mfs_apply_postprocessing`` on the predictions of a
trained smoke fold run with two seeds (K = 2 samples each, with uncertainty maps), in-process. (Members from
two seeds stand for folds: to the ensemble both are just prediction folders; one fold keeps the test short.)"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import ensemble, postprocessing
from tests.cli.conftest import predict_into, train_smoke_folds
from tests.conftest import set_nnunet_env

@pytest.fixture(scope="module")
def folds(tmp_path_factory, planned_workflow_dataset):
    """One trained fold predicting 2 training images with (seed 0, 1 step) and (seed 10, 3 Euler steps), K = 2
    samples and uncertainty maps (a smoke model's one-step samples may not depend on the seed at all)."""
    root = tmp_path_factory.mktemp("ensemble_cli")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw, model = train_smoke_folds(planned_workflow_dataset, root, (0,))
        inputs = root / "inputs"
        inputs.mkdir()
        for f in sorted((raw / "imagesTr").iterdir())[:2]:
            shutil.copy(f, inputs)
        preds = [root / f"pred_seed{s}" for s in (0, 10)]
        for (seed, steps), out in zip((("0", "1"), ("10", "3")), preds):
            assert predict_into(model, inputs, out, "0", "--save_uncertainty", "--num_samples", "2",
                                "--seed", seed, "--steps", steps) == 0
        cases = sorted(f.name[: -len("_0000.nii.gz")] for f in inputs.iterdir())
        yield SimpleNamespace(root=root, raw=raw, model=model, inputs=inputs, preds=preds, cases=cases)


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def check_member_disagreement(members: list, out, cases: list[str]) -> bool:
    """The ensemble's disagreement map of 2 members is 1 exactly where their argmax labels differ; True if they
    differ anywhere."""
    differs = False
    for case in cases:
        labels = [np.load(p / f"{case}.npz")["probabilities"].argmax(0) for p in members]
        dis = read(out / "uncertainty" / f"{case}_disagreement.nii.gz")
        assert 0 <= dis.min() and dis.max() <= 1
        assert np.array_equal(dis > 0.5, labels[0] != labels[1])  # 2 members: 1 pair, 0 or 1
        differs |= bool(dis.max() > 0)
    return differs


def test_ensemble_of_two_runs(folds, tmp_path, capsys):
    out = tmp_path / "ens"
    assert ensemble.main(["-i", *map(str, folds.preds), "-o", str(out), "-np", "0", "--save_npz"]) == 0
    assert "2 case(s) from 2 folders" in capsys.readouterr().out
    for case in folds.cases:
        members = [np.load(p / f"{case}.npz")["probabilities"].astype(np.float32) for p in folds.preds]
        avg = np.load(out / f"{case}.npz")["probabilities"]
        assert np.allclose(avg, (members[0] + members[1]) / 2, atol=1e-6)
        seg = read(out / f"{case}.nii.gz")
        assert np.array_equal(seg, avg.argmax(0))
        image = sitk.ReadImage(str(folds.inputs / f"{case}_0000.nii.gz"))
        for path in (out / f"{case}.nii.gz", out / "uncertainty" / f"{case}_entropy.nii.gz",
                     out / "uncertainty" / f"{case}_disagreement.nii.gz"):
            written = sitk.ReadImage(str(path))
            assert written.GetSize() == image.GetSize() and np.allclose(written.GetSpacing(), image.GetSpacing())
            assert np.allclose(written.GetOrigin(), image.GetOrigin())
    check_member_disagreement(folds.preds, out, folds.cases)
    # whether the two smoke runs' segmentations differ depends on the (unseeded-augmentation) smoke training, so
    # the map is also checked on a member that differs by construction: run 0 with its class channels rolled
    rolled = tmp_path / "rolled"
    shutil.copytree(folds.preds[0], rolled)
    for case in folds.cases:
        probs = np.load(rolled / f"{case}.npz")["probabilities"]
        np.savez_compressed(rolled / f"{case}.npz", probabilities=np.roll(probs, 1, axis=0))
    out2 = tmp_path / "ens_rolled"
    assert ensemble.main(["-i", str(folds.preds[0]), str(rolled), "-o", str(out2), "-np", "0"]) == 0
    assert check_member_disagreement([folds.preds[0], rolled], out2, folds.cases)


def test_ensemble_bad_input_exits_2(folds, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folds.preds[0] / "dataset.json", empty)
    shutil.copy(folds.preds[0] / "plans.json", empty)
    assert ensemble.main(["-i", str(folds.preds[0]), str(empty), "-o", str(tmp_path / "o"), "-np", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no case has a .npz in every input folder")
    broken = tmp_path / "broken"
    shutil.copytree(folds.preds[1], broken)
    (broken / f"{folds.cases[0]}.pkl").unlink()
    assert ensemble.main(["-i", str(folds.preds[0]), str(broken), "-o", str(tmp_path / "o"), "-np", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".pkl is missing" in err[0]
    case = folds.cases[0]
    probs = np.load(broken / f"{case}.npz")["probabilities"]
    np.savez_compressed(broken / f"{case}.npz", probabilities=probs[:, :-1])
    shutil.copy(folds.preds[1] / f"{case}.pkl", broken)
    assert ensemble.main(["-i", str(folds.preds[0]), str(broken), "-o", str(tmp_path / "o"), "-np", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in shape" in err[0]


def test_determine_and_apply_postprocessing(folds, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(folds.preds[0], pred)
    ref = folds.raw / "labelsTr"
    assert postprocessing.main_determine(["-i", str(pred), "-ref", str(ref), "-np", "1"]) == 0
    assert "foreground mean Dice" in capsys.readouterr().out
    assert (pred / "postprocessing.pkl").is_file() and (pred / "postprocessing.json").is_file()
    out = tmp_path / "pp"
    assert postprocessing.main_apply(["-i", str(pred), "-o", str(out), "-pp_pkl_file",
                                      str(pred / "postprocessing.pkl"), "-np", "1"]) == 0
    labels = set(json.loads((pred / "dataset.json").read_text())["labels"].values())
    for case in folds.cases:
        seg = read(out / f"{case}.nii.gz")
        assert seg.shape == read(pred / f"{case}.nii.gz").shape and set(np.unique(seg)) <= labels
    assert (out / "plans.json").is_file()
    assert postprocessing.main_determine(["-i", str(pred), "-ref", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: reference folder")
    assert postprocessing.main_apply(["-i", str(pred), "-o", str(out), "-pp_pkl_file", str(tmp_path / "x.pkl")]) == 2
