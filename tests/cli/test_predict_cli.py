"""``mfs_predict`` end to end with a trained smoke model: K samples, probabilities, uncertainty maps, overlays,
seeds, and robustness of folder runs (corrupt inputs, reruns, --overwrite)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.synthetic import make_synthetic_dataset
from tests.conftest import set_nnunet_env

GEOMETRY = dict(spacing=(0.9, 1.0, 1.2), origin=(10.0, -5.0, 3.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Plan and train ``MedFlowSegTrainer_smoke`` once for the module; test images get a non-trivial geometry."""
    root = tmp_path_factory.mktemp("predict_cli")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", 992, num_train=6, num_test=3, shape=(20, 24, 20))
        assert plan_and_preprocess.main(["-d", "992", "-c", "3d_fullres", "-np", "1"]) == 0
        assert train.main(["992", "3d_fullres", "0", "-tr", "MedFlowSegTrainer_smoke", "-device", "cpu"]) == 0
        inputs = root / "inputs"
        inputs.mkdir()
        for f in sorted((raw / "imagesTs").iterdir()):
            img = sitk.ReadImage(str(f))
            img.SetSpacing(GEOMETRY["spacing"])
            img.SetOrigin(GEOMETRY["origin"])
            img.SetDirection(GEOMETRY["direction"])
            sitk.WriteImage(img, str(inputs / f.name), useCompression=True)
        model = root / "nnUNet_results" / raw.name / "MedFlowSegTrainer_smoke__MedFlowSegPlans__3d_fullres"
        yield SimpleNamespace(root=root, inputs=inputs, model=model, cases=sorted(f.name for f in inputs.iterdir()))


def run(trained, inputs: Path, out: Path, *extra: str) -> int:
    return predict.main(["-i", str(inputs), "-o", str(out), "-m", str(trained.model), "-f", "0", "-device", "cpu",
                         "--disable_tta", "-npp", "0", "-nps", "0", *extra])


def same_geometry(path: Path, reference: Path) -> bool:
    a, b = sitk.ReadImage(str(path)), sitk.ReadImage(str(reference))
    return a.GetSize() == b.GetSize() and all(np.allclose(getattr(a, g)(), getattr(b, g)())
                                              for g in ("GetSpacing", "GetOrigin", "GetDirection"))


def test_k_samples_probabilities_uncertainty_and_overlays(trained, tmp_path):
    out, png = tmp_path / "pred", tmp_path / "png"
    assert run(trained, trained.inputs, out, "--num_samples", "3", "--save_probabilities", "--save_uncertainty",
               "--overlay_png", str(png)) == 0
    for name in trained.cases:
        case = name[: -len("_0000.nii.gz")]
        image = trained.inputs / name
        for path in (out / f"{case}.nii.gz", out / "uncertainty" / f"{case}_entropy.nii.gz",
                     out / "uncertainty" / f"{case}_disagreement.nii.gz"):
            assert same_geometry(path, image), path
        probs = np.load(out / f"{case}.npz")["probabilities"]
        assert probs.shape[0] == 3 and np.allclose(probs.sum(0), 1, atol=1e-3)
        assert (out / f"{case}.pkl").is_file()
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_entropy.nii.gz")))
        disagreement = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_disagreement.nii.gz")))
        assert entropy.dtype == np.float32 and 0 <= entropy.min() and entropy.max() <= np.log(3) + 1e-4
        assert 0 <= disagreement.min() and disagreement.max() <= 1
        assert (png / f"{case}.png").stat().st_size > 1000
    assert not (out / ".mfs_partial").exists()
    # mfs_evaluate and nnU-Net's tools see only segmentations in -o
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(n.replace("_0000", "") for n in trained.cases)


def test_same_seed_is_bit_identical_and_seeds_differ(trained, tmp_path):
    one = tmp_path / "in"
    one.mkdir()
    shutil.copy(trained.inputs / trained.cases[0], one)
    case = trained.cases[0].replace("_0000.nii.gz", "")
    outputs = {}
    for run_name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        # two steps: with the time-scaled input (the default) one step does not depend on the prior's seed
        assert run(trained, one, tmp_path / run_name, "--seed", seed, "--num_samples", "2", "--steps", "2",
                   "--save_probabilities") == 0
        outputs[run_name] = (np.load(tmp_path / run_name / f"{case}.npz")["probabilities"],
                             sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run_name / f"{case}.nii.gz"))))
    assert np.array_equal(outputs["a"][0], outputs["b"][0]) and np.array_equal(outputs["a"][1], outputs["b"][1])
    assert not np.array_equal(outputs["a"][0], outputs["c"][0])


def test_corrupt_inputs_are_reported_the_rest_written_and_reruns_skip(trained, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = [n.replace("_0000.nii.gz", "") for n in trained.cases[:2]]
    for case in good:
        shutil.copy(trained.inputs / f"{case}_0000.nii.gz", inputs)
    data = (trained.inputs / trained.cases[2]).read_bytes()
    (inputs / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    for channel in ("0000", "0001"):  # the model has one input channel
        shutil.copy(trained.inputs / trained.cases[2], inputs / f"twochannel_{channel}.nii.gz")

    assert run(trained, inputs, out) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "2 case(s) could not be predicted" in errors[0]
    assert any(e.startswith("error: truncated_0000.nii.gz: unreadable image file") for e in errors)
    assert any(e.startswith("error: twochannel_0000.nii.gz, twochannel_0001.nii.gz: 2 channel(s) but the model "
                            "expects 1") for e in errors)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in good]
    stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in good}

    assert run(trained, inputs, out) == 2  # default: cases already done are skipped
    assert run(trained, inputs, out, "--continue_prediction") == 2  # nnU-Net's flag, same behaviour
    assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in good} == stamps

    # a run killed mid-write leaves at most a file in .mfs_partial, never a truncated output; it is redone
    os.remove(out / f"{good[0]}.nii.gz")
    (out / ".mfs_partial").mkdir()
    (out / ".mfs_partial" / f"{good[0]}.nii.gz").write_bytes(b"half a file")
    shutil.rmtree(inputs)
    inputs.mkdir()
    for case in good:
        shutil.copy(trained.inputs / f"{case}_0000.nii.gz", inputs)
    assert run(trained, inputs, out) == 0
    assert (out / f"{good[0]}.nii.gz").stat().st_mtime_ns > stamps[good[0]]
    assert (out / f"{good[1]}.nii.gz").stat().st_mtime_ns == stamps[good[1]]
    assert sitk.ReadImage(str(out / f"{good[0]}.nii.gz")).GetSize() == sitk.ReadImage(
        str(inputs / f"{good[0]}_0000.nii.gz")).GetSize()
    assert not (out / ".mfs_partial").exists()

    assert run(trained, inputs, out, "--overwrite") == 0  # redoes every case
    assert all((out / f"{c}.nii.gz").stat().st_mtime_ns > stamps[c] for c in good)


def test_parts_are_disjoint_cover_the_folder_and_match_one_run(trained, tmp_path, capsys):
    """-num_parts 2 -part_id I: two workers into one folder write every case once, as a single run would."""
    cases = sorted(n.replace("_0000.nii.gz", "") for n in trained.cases)
    shared, single = tmp_path / "shared", tmp_path / "single"
    written = []
    for part in (0, 1):
        before = set(p.name for p in shared.glob("*.nii.gz")) if shared.exists() else set()
        assert run(trained, trained.inputs, shared, "-num_parts", "2", "-part_id", str(part)) == 0
        written.append(sorted(set(p.name for p in shared.glob("*.nii.gz")) - before))
    assert written == [[f"{c}.nii.gz" for c in cases[0::2]], [f"{c}.nii.gz" for c in cases[1::2]]]
    stamps = {p.name: p.stat().st_mtime_ns for p in shared.glob("*.nii.gz")}
    assert run(trained, trained.inputs, shared, "-num_parts", "2", "-part_id", "1") == 0  # a restarted worker
    assert {p.name: p.stat().st_mtime_ns for p in shared.glob("*.nii.gz")} == stamps  # ... redoes nothing
    assert run(trained, trained.inputs, single) == 0
    for c in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(shared / f"{c}.nii.gz")))
        assert np.array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(single / f"{c}.nii.gz"))))
    capsys.readouterr()
    assert run(trained, trained.inputs, shared, "-num_parts", "2", "-part_id", "2") == 2
    assert "-part_id must be in 0 .. 1" in capsys.readouterr().err


def test_fold_calibration_changes_probabilities_not_segmentations(trained, tmp_path):
    import json
    file = trained.model / "fold_0" / "temperature.json"
    saved = json.loads(file.read_text())
    temperature = saved["temperature"]
    assert saved["top_label_map"]["confidence"]  # fitted at the end of training, with T
    try:
        file.write_text(json.dumps({k: v for k, v in saved.items() if k != "top_label_map"}))  # a file of T alone
        assert run(trained, trained.inputs, tmp_path / "t", "--save_probabilities") == 0
    finally:
        file.write_text(json.dumps(saved))
    assert run(trained, trained.inputs, tmp_path / "map", "--save_probabilities") == 0
    assert run(trained, trained.inputs, tmp_path / "off", "--save_probabilities", "--no_temperature") == 0
    case = trained.cases[0][: -len("_0000.nii.gz")]
    scaled, recalibrated, plain = (np.load(tmp_path / d / f"{case}.npz")["probabilities"] for d in ("t", "map", "off"))
    seg_t, seg_map, seg_off = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{case}.nii.gz")))
                               for d in ("t", "map", "off"))
    # the argmax is the same up to near-ties: nnU-Net resamples float16 logits, ours are float32 after the division
    top2 = np.sort(plain, 0)[-2:]
    differ = seg_t != seg_off
    assert differ.mean() < 1e-3 and (top2[1][differ] - top2[0][differ] < 1e-2).all()
    # p_T = softmax(log p / T), up to nnU-Net's float16 logits
    expected = np.exp(np.log(np.clip(plain, 1e-12, None)) / temperature)
    expected /= expected.sum(0, keepdims=True)
    assert temperature != 1.0 and np.allclose(scaled, expected, atol=2e-2)
    assert not np.allclose(scaled, plain, atol=1e-3) or abs(temperature - 1) < 0.05
    # with the map: the segmentation of T alone, the probabilities mapped before nnU-Net's resampling (a map is not
    # linear: where the resampling interpolates they differ from the map of the resampled T-probabilities)
    assert np.array_equal(seg_map, seg_t) and np.array_equal(recalibrated.argmax(0), seg_map)
    assert np.allclose(recalibrated.sum(0), 1, atol=1e-3) and not np.allclose(recalibrated, scaled, atol=1e-2)
