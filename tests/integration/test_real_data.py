"""The pipeline on subsets of the real datasets in ../shared/data (skipped when absent)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from tests.conftest import shared_dataset


def link_subset(source: Path, raw_root: Path, num_cases: int) -> tuple[Path, list[str]]:
    """A raw dataset folder with the first ``num_cases`` cases of ``source`` (symlinks, nothing copied)."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (source / "labelsTr").iterdir() if p.name.endswith(ending))
    cases = cases[:num_cases]
    target = raw_root / source.name
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
    for case in cases:
        (target / "labelsTr" / f"{case}{ending}").symlink_to(source / "labelsTr" / f"{case}{ending}")
        for img in (source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
            (target / "imagesTr" / img.name).symlink_to(img)
    dataset_json["numTraining"] = len(cases)
    (target / "dataset.json").write_text(json.dumps(dataset_json))
    return target, cases


def run_pipeline(nnunet_env: dict, tmp_path: Path, source: Path, configuration: str, num_cases: int,
                 num_predict: int) -> tuple[Path, Path, list[str]]:
    raw, cases = link_subset(source, nnunet_env["nnUNet_raw"], num_cases)
    dataset_id = raw.name[7:10]
    assert plan_and_preprocess.main(["-d", dataset_id, "-c", configuration, "-np", "2"]) == 0
    assert train.main([dataset_id, configuration, "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu"]) == 0
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in cases[:num_predict]:
        for img in (raw / "imagesTr").glob(f"{case}_*"):
            (inputs / img.name).symlink_to(img.resolve())
    out = tmp_path / "pred"
    assert predict.main(["-i", str(inputs), "-o", str(out), "-d", dataset_id, "-c", configuration,
                         "-tr", "MedFlowSegTrainer_smoke", "-f", "0", "-device", "cpu", "--disable_tta"]) == 0
    return raw, out, cases[:num_predict]


def test_hippocampus_predictions_keep_input_geometry(nnunet_env, tmp_path):
    source = shared_dataset("Dataset004_Hippocampus")
    raw, out, cases = run_pipeline(nnunet_env, tmp_path, source, "3d_fullres", num_cases=10, num_predict=3)
    for case in cases:
        image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        assert np.allclose(pred.GetOrigin(), image.GetOrigin())
        assert np.allclose(pred.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_retina_vessels_2d_rgb_png(nnunet_env, tmp_path):
    source = shared_dataset("Dataset120_RetinaVessels")
    raw, out, cases = run_pipeline(nnunet_env, tmp_path, source, "2d", num_cases=8, num_predict=2)
    plans = json.loads((nnunet_env["nnUNet_preprocessed"] / raw.name / "MedFlowSegPlans.json").read_text())
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    for case in cases:
        pred = out / f"{case}.png"
        assert pred.is_file()
        from skimage.io import imread
        image, seg = imread(raw / "imagesTr" / f"{case}_0000.png"), imread(pred)
        assert seg.shape == image.shape[:2] and set(np.unique(seg).tolist()) <= {0, 1}


@pytest.mark.slow
def test_brats_two_channels_five_classes(nnunet_env, tmp_path):
    source = shared_dataset("Dataset130_BraTS2013mini")
    raw, out, cases = run_pipeline(nnunet_env, tmp_path, source, "3d_fullres", num_cases=6, num_predict=1)
    for case in cases:
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3, 4}
