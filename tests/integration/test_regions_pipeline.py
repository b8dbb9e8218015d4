"""Region-based training with the ignore label end to end on a synthetic dataset: plan, ``mfs_train`` (smoke
budget, nnU-Net's final validation included), ``mfs_predict`` with K samples, probabilities and uncertainty."""
from __future__ import annotations

import json
import math

import numpy as np
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.inference.uncertainty import region_entropy
from medflowseg_nn.synthetic import make_synthetic_dataset

GEOMETRY = dict(spacing=(0.9, 1.0, 1.2), origin=(10.0, -5.0, 3.0))


def test_regions_with_ignore_label_train_and_predict(nnunet_env, tmp_path):
    raw = make_synthetic_dataset(nnunet_env["nnUNet_raw"], 975, num_train=6, num_test=2, shape=(16, 20, 16),
                                 regions=True, ignore_fraction=0.3)
    assert json.loads((raw / "dataset.json").read_text())["regions_class_order"] == [1, 2]
    assert plan_and_preprocess.main(["-d", "975", "-c", "3d_fullres", "-np", "1", "--no_verify"]) == 0
    assert train.main(["975", "3d_fullres", "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu"]) == 0
    model = nnunet_env["nnUNet_results"] / raw.name / "MedFlowSegTrainer_smoke__MedFlowSegPlans__3d_fullres"
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert len(summary["mean"]) == 2  # nnU-Net's final validation, per region (whole, core)

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in sorted((raw / "imagesTs").iterdir()):
        img = sitk.ReadImage(str(f))
        img.SetSpacing(GEOMETRY["spacing"])
        img.SetOrigin(GEOMETRY["origin"])
        sitk.WriteImage(img, str(inputs / f.name), useCompression=True)
    out = tmp_path / "pred"
    assert predict.main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu",
                         "--disable_tta", "-npp", "0", "-nps", "0", "--num_samples", "3", "--save_probabilities",
                         "--save_uncertainty"]) == 0
    for f in sorted(inputs.iterdir()):
        case = f.name[: -len("_0000.nii.gz")]
        image, pred = sitk.ReadImage(str(f)), sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing()) and np.allclose(pred.GetOrigin(), image.GetOrigin())
        seg = sitk.GetArrayFromImage(pred)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}  # valid labels only: never the ignore label (3)
        probs = np.load(out / f"{case}.npz")["probabilities"]  # one sigmoid probability per region
        assert probs.shape == (2, *seg.shape) and probs.min() >= 0 and probs.max() <= 1
        expected = np.zeros_like(seg)  # nnU-Net's regions_class_order [1, 2]: core painted over whole
        expected[probs[0] > 0.5] = 1
        expected[probs[1] > 0.5] = 2
        assert np.array_equal(seg, expected)
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_entropy.nii.gz")))
        disagreement = sitk.GetArrayFromImage(
            sitk.ReadImage(str(out / "uncertainty" / f"{case}_disagreement.nii.gz")))
        assert 0 <= entropy.min() and entropy.max() <= 2 * math.log(2) + 1e-4 and entropy.max() > 0
        assert np.allclose(entropy, region_entropy(probs), atol=1e-5)  # sum of the per-region binary entropies
        assert 0 <= disagreement.min() and disagreement.max() <= 1
