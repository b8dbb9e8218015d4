"""Region-based training on the real BraTS subset (slow; skipped when the data is absent).

nnU-Net's BraTS regions for the 2013 labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing): whole tumour
(1, 2, 3, 4), tumour core (1, 3, 4), enhancing tumour (4); ``regions_class_order`` [2, 1, 4] paints the whole
tumour as edema, the core over it as necrosis and the enhancing tumour last. The network is shrunk in the plans
and the smoke trainer runs without mirroring (nnU-Net's final validation would otherwise predict every
240x240x155 volume 8 times), so that it finishes on 2 CPU cores in well under 15 minutes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from tests.conftest import shared_dataset, shrink_network
from tests.integration.test_real_data import link_subset

TRAINER = "MedFlowSegTrainer_smokeNoMirroring"
REGIONS = {"background": 0, "whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing_tumour": 4}


@pytest.mark.slow
def test_brats_regions_train_and_predict(nnunet_env, tmp_path):
    source = shared_dataset("Dataset130_BraTS2013mini")
    raw, cases = link_subset(source, nnunet_env["nnUNet_raw"], 6)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    dataset_json.update(labels=REGIONS, regions_class_order=[2, 1, 4])
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    assert plan_and_preprocess.main(["-d", "130", "-c", "3d_fullres", "-np", "2", "--no_verify"]) == 0
    shrink_network(nnunet_env["nnUNet_preprocessed"] / raw.name / "MedFlowSegPlans.json")
    assert train.main(["130", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]) == 0
    model = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__MedFlowSegPlans__3d_fullres"
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert len(summary["mean"]) == 3  # one entry per region
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for img in (raw / "imagesTr").glob(f"{cases[0]}_*"):
        (inputs / img.name).symlink_to(img.resolve())
    out = tmp_path / "pred"
    assert predict.main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu",
                         "--disable_tta", "--save_uncertainty", "--num_samples", "2"]) == 0
    pred = sitk.ReadImage(str(out / f"{cases[0]}.nii.gz"))
    image = sitk.ReadImage(str(raw / "imagesTr" / f"{cases[0]}_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize() and np.allclose(pred.GetSpacing(), image.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 4}  # regions_class_order's labels
    disagreement = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{cases[0]}_disagreement.nii.gz")))
    assert 0 <= disagreement.min() and disagreement.max() <= 1
