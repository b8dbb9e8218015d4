"""The three CLIs in-process on tiny synthetic datasets, 3D and 2D."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.recalibration import TopLabelMap, apply_top_label_map
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
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    # calibrated on 3 smoke runs each (2 CPU cores): 3d_fullres class-1 Dice 0.80 every time, where predicting
    # label 1 everywhere scores about 0.16; the 2d smoke model (4 iterations) is erratic (foreground mean 0.15 -
    # 0.37, about chance level), so in 2d only "it segments something" is required
    if configuration == "3d_fullres":
        assert summary["mean"]["1"]["Dice"] >= 0.5, summary["mean"]
    else:
        assert summary["foreground_mean"]["Dice"] > 0.05 and summary["foreground_mean"]["n_pred"] > 0, summary
    # the results folder's plans keep the flow block, with the default DBSA/FAA placement written out
    n = arch["arch_kwargs"]["n_stages"]
    block = plans["flow_matching"]
    assert block["network"]["dbsa_stages"] is None and block["network"]["faa_stages"] is None
    expected = {**block, "network": {**block["network"], "dbsa_stages": [n - 2], "faa_stages": [n - 2, n - 1]}}
    assert json.loads((model / "plans.json").read_text())["flow_matching"] == expected

    # the fold's temperature, fitted on the validation probabilities, which are not kept without --npz
    fitted = json.loads((fold / "temperature.json").read_text())
    assert fitted["fitted_on"]["sampler"] == {"steps": 1, "solver": "euler", "num_samples": 1}
    assert fitted["fitted_on"]["checkpoint"] == "checkpoint_final.pth"  # the weights it was fitted on
    assert 0.05 <= fitted["temperature"] <= 20 and not list((fold / "validation").glob("*.npz"))
    # mfs_predict divides the logits by it when the sampler settings match, and not for other settings
    loaded = {}
    for name, kwargs in (("T", {}), ("off", {"use_temperature": False}), ("K2", {"num_samples": 2})):
        loaded[name] = MedFlowSegPredictor(device=torch.device("cpu"), allow_tqdm=False, **kwargs)
        loaded[name].initialize_from_trained_model_folder(str(model), (0,))
    assert [c.temperature for c in loaded["T"].fold_calibrations] == [fitted["temperature"]]
    assert loaded["T"].fold_calibrations[0].top_label_map.to_dict() == fitted["top_label_map"]
    assert loaded["off"].fold_calibrations == [None] and loaded["K2"].fold_calibrations == [None]
    patch = plans["configurations"][configuration]["patch_size"]
    data = torch.randn(1, *([1] if len(patch) == 2 else []), *patch)  # nnU-Net's 2d cases are [C, 1, H, W]
    calibrated, plain = (loaded[k].predict_case(data, with_mapped=True) for k in ("T", "off"))
    scaled, plain = calibrated.logits, plain.logits
    assert torch.equal(scaled.argmax(0), plain.argmax(0))  # division in float32 keeps every order and tie
    assert torch.equal(scaled, plain.float() / fitted["temperature"])
    # the exported probabilities: T, then the top-label map (same argmax); none without a temperature file
    expected = apply_top_label_map(torch.softmax(scaled, 0), TopLabelMap.from_dict(fitted["top_label_map"]))
    torch.testing.assert_close(torch.softmax(calibrated.mapped, 0), expected)
    assert torch.equal(calibrated.mapped.argmax(0), plain.argmax(0))
    assert loaded["off"].predict_case(data, with_mapped=True).mapped is None
    assert loaded["T"].predict_case(data).mapped is None  # only when asked for

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
    shutil.rmtree(fold / "validation")
    assert train.main(["990", configuration, "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu",
                       "--val"]) == 0
    val_cases = json.loads((nnunet_env["nnUNet_preprocessed"] / raw.name / "splits_final.json").read_text())[0]["val"]
    assert val_cases and sorted(p.name for p in (fold / "validation").glob("*.nii.gz")) == \
        sorted(f"{c}.nii.gz" for c in val_cases)
    again = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(again["metric_per_case"]) == len(val_cases)
    assert again["foreground_mean"]["Dice"] == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-6)
