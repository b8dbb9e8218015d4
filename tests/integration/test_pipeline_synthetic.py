"""The three CLIs in-process on tiny synthetic datasets, 3D and 2D."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.synthetic import make_synthetic_dataset


@pytest.mark.parametrize("shape,configuration", [((24, 28, 24), "3d_fullres"), ((48, 56), "2d")])
def test_plan_train_predict(nnunet_env, tmp_path, shape, configuration):
    raw = make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, num_train=6, num_test=2, shape=shape)
    assert plan_and_preprocess.main(["-d", "990", "-c", configuration, "-np", "1"]) == 0
    plans = json.loads((nnunet_env["nnUNet_preprocessed"] / raw.name / "MedFlowSegPlans.json").read_text())
    assert plans["flow_matching"]["parameterization"] == "x1"
    arch = plans["configurations"][configuration]["architecture"]
    assert arch["network_class_name"].endswith("VectorFieldUNet")
    # nnU-Net's preprocessed data and identifiers are reused
    assert plans["configurations"][configuration]["preprocessor_name"] == "DefaultPreprocessor"

    assert train.main(["990", configuration, "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu"]) == 0
    model = nnunet_env["nnUNet_results"] / raw.name / f"MedFlowSegTrainer_smoke__MedFlowSegPlans__{configuration}"
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0
    # the results folder's plans keep the flow block, with the default DBSA/FAA placement written out
    n = arch["arch_kwargs"]["n_stages"]
    block = plans["flow_matching"]
    assert block["network"]["dbsa_stages"] is None and block["network"]["faa_stages"] is None
    expected = {**block, "network": {**block["network"], "dbsa_stages": [n - 2], "faa_stages": [n - 2, n - 1]}}
    assert json.loads((model / "plans.json").read_text())["flow_matching"] == expected

    out = tmp_path / "pred"
    assert predict.main(["-i", str(raw / "imagesTs"), "-o", str(out), "-d", "990", "-c", configuration,
                         "-tr", "MedFlowSegTrainer_smoke", "-f", "0", "-device", "cpu", "--disable_tta"]) == 0
    for ref in sorted((raw / "labelsTs").iterdir()):
        pred = sitk.ReadImage(str(out / ref.name))
        ref_img = sitk.ReadImage(str(ref))
        assert pred.GetSize() == ref_img.GetSize()
        assert np.allclose(pred.GetSpacing(), ref_img.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}

    # continuing a finished training only re-runs what is missing; --val re-runs the validation
    assert train.main(["990", configuration, "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu",
                       "--val"]) == 0
