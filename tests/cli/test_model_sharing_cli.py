"""``mfs_export_model_to_zip`` → ``mfs_install_pretrained_model_from_zip`` into a fresh nnUNet_results →
``mfs_predict`` with a fixed seed gives bit-identical outputs to the original model's."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import model_sharing
from medflowseg_nn.config import FlowMatchingConfig
from tests.cli.conftest import TRAINER, WORKFLOW_DATASET, predict_into, train_smoke_folds
from tests.conftest import set_nnunet_env


@pytest.fixture(scope="module")
def trained(tmp_path_factory, planned_workflow_dataset):
    root = tmp_path_factory.mktemp("model_sharing")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw, model = train_smoke_folds(planned_workflow_dataset, root, (0,))
        yield raw, model


def outputs(folder, case: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(folder / f"{case}.npz")["probabilities"],
            sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz"))))


def test_export_install_predict_is_bit_identical(trained, tmp_path, monkeypatch, capsys):
    raw, model = trained
    monkeypatch.setenv("nnUNet_results", str(model.parents[1]))
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(sorted((raw / "imagesTs").iterdir())[0], inputs)
    case = next(inputs.iterdir()).name[: -len("_0000.nii.gz")]
    zip_file = tmp_path / "model.zip"
    own = model / "fold_0" / "temperature_own_fold.json"  # as mfs_pool_calibration keeps a fold's own fit
    own.write_text('{"temperature": 1.5, "fitted_on": {}}')
    try:
        assert model_sharing.main_export(["-d", str(WORKFLOW_DATASET), "-c", "3d_fullres", "-tr", TRAINER, "-p",
                                          "MedFlowSegPlans", "-f", "0", "-o", str(zip_file)]) == 0
    finally:
        own.unlink()
    with zipfile.ZipFile(zip_file) as z:
        names = z.namelist()
        plans = json.loads(z.read(f"{model.parent.name}/{model.name}/plans.json"))
    assert f"{model.parent.name}/{model.name}/fold_0/checkpoint_final.pth" in names
    assert f"{model.parent.name}/{model.name}/fold_0/temperature.json" in names  # the trainer fitted one
    block = plans["flow_matching"]  # resolved: every key written out, nothing left to code defaults
    assert block == FlowMatchingConfig.from_dict(block).to_dict() and block["network"]["dbsa_stages"] is not None
    assert predict_into(model, inputs, tmp_path / "orig", "0", "--seed", "7", "--num_samples", "2") == 0

    fresh = tmp_path / "fresh_results"
    monkeypatch.setenv("nnUNet_results", str(fresh))
    assert model_sharing.main_install([str(zip_file)]) == 0
    installed = fresh / model.parent.name / model.name
    assert f"installed {installed}" in capsys.readouterr().out
    fitted = "fold_0/temperature.json"
    assert (installed / fitted).read_text() == (model / fitted).read_text()
    assert (installed / "fold_0" / "temperature_own_fold.json").read_text() == '{"temperature": 1.5, "fitted_on": {}}'
    assert predict_into(installed, inputs, tmp_path / "inst", "0", "--seed", "7", "--num_samples", "2") == 0
    (p0, s0), (p1, s1) = outputs(tmp_path / "orig", case), outputs(tmp_path / "inst", case)
    assert np.array_equal(p0, p1) and np.array_equal(s0, s1)


def test_bad_input_exits_2(trained, tmp_path, monkeypatch, capsys):
    raw, model = trained
    monkeypatch.setenv("nnUNet_results", str(model.parents[1]))
    monkeypatch.setenv("nnUNet_raw", str(raw.parent))
    assert model_sharing.main_export(["-d", str(WORKFLOW_DATASET), "-tr", TRAINER, "-f", "3", "-o",
                                      str(tmp_path / "m.zip")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fold_3" in err[0] and not (tmp_path / "m.zip").exists()
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    assert model_sharing.main_install([str(not_zip)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a zip file" in err[0]
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside/plans.json", "{}")
    assert model_sharing.main_install([str(evil)]) == 2
    assert "outside nnUNet_results" in capsys.readouterr().err
