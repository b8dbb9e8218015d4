"""``medflowseg_nn.ensembling`` on hand-made prediction folders (no training): nnU-Net's average, argmax,
geometry, the ensemble's uncertainty maps, and the input checks."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.ensembling.ensemble import average_probabilities
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from medflowseg_nn.ensembling import ensemble_folders, member_disagreement
from medflowseg_nn.errors import UserError

SHAPE = (6, 7, 5)  # z, y, x as SimpleITK returns it
LABELS = {"background": 0, "a": 1, "b": 2}
PLANS = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "plans_name": "MedFlowSegPlans"}


@pytest.fixture(scope="module")
def properties(tmp_path_factory) -> dict:
    """The reader properties of an image with a non-trivial geometry."""
    path = tmp_path_factory.mktemp("image") / "img_0000.nii.gz"
    img = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    img.SetSpacing((0.9, 1.0, 1.2))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(path))
    return SimpleITKIO().read_images([str(path)])[1]


def make_member(folder: Path, properties: dict, probabilities: dict[str, np.ndarray], uncertainty: bool = True,
                labels: dict = LABELS) -> Path:
    """A prediction folder as mfs_predict writes it: CASE.npz/.pkl/.nii.gz, dataset.json, plans.json."""
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    (folder / "plans.json").write_text(json.dumps(PLANS))
    for case, p in probabilities.items():
        np.savez_compressed(folder / f"{case}.npz", probabilities=p)
        (folder / f"{case}.pkl").write_bytes(pickle.dumps(properties))
        SimpleITKIO().write_seg(p.argmax(0).astype(np.uint8), str(folder / f"{case}.nii.gz"), properties)
        if uncertainty:
            (folder / "uncertainty").mkdir(exist_ok=True)
            for kind in ("entropy", "disagreement"):
                (folder / "uncertainty" / f"{case}_{kind}.nii.gz").write_bytes(b"")
    return folder


def random_probabilities(seed: int, shape=SHAPE) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(3, *shape)).astype(np.float32) * 3
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float16 if seed == 1 else np.float32)  # nnU-Net writes float16 too


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_average_argmax_geometry_and_uncertainty(tmp_path, properties):
    members = [make_member(tmp_path / f"m{s}", properties, {"c1": random_probabilities(s),
                                                            "c2": random_probabilities(s + 10)}) for s in range(3)]
    out = tmp_path / "ens"
    assert ensemble_folders(members, str(out), save_probabilities=True, num_processes=0) == ["c1", "c2"]
    assert json.loads((out / "plans.json").read_text()) == PLANS and (out / "dataset.json").is_file()
    for case in ("c1", "c2"):
        avg = np.load(out / f"{case}.npz")["probabilities"]
        assert np.array_equal(avg, average_probabilities([str(m / f"{case}.npz") for m in members]))
        hand = sum(np.load(m / f"{case}.npz")["probabilities"].astype(np.float64) for m in members) / 3
        assert np.allclose(avg, hand, atol=1e-6)
        seg_path = out / f"{case}.nii.gz"
        assert np.array_equal(read(seg_path), avg.argmax(0))
        image = sitk.ReadImage(str(seg_path))
        for path in (seg_path, out / "uncertainty" / f"{case}_entropy.nii.gz",
                     out / "uncertainty" / f"{case}_disagreement.nii.gz"):
            other = sitk.ReadImage(str(path))
            assert other.GetSize() == image.GetSize() and np.allclose(other.GetSpacing(), (0.9, 1.0, 1.2))
            assert np.allclose(other.GetOrigin(), (10.0, -5.0, 3.0)) and np.allclose(other.GetDirection(),
                                                                                    (-1, 0, 0, 0, 1, 0, 0, 0, 1))
        entropy = read(out / "uncertainty" / f"{case}_entropy.nii.gz")
        expected = -(avg * np.log(np.clip(avg, 1e-12, None))).sum(0)
        assert np.allclose(entropy, expected, atol=1e-5)
        dis = read(out / "uncertainty" / f"{case}_disagreement.nii.gz")
        labels = np.stack([np.load(m / f"{case}.npz")["probabilities"].argmax(0) for m in members])
        differing = sum((labels[i] != labels[j]).astype(np.float32) for i in range(3) for j in range(i + 1, 3)) / 3
        assert np.allclose(dis, differing) and 0 <= dis.min() and dis.max() <= 1 and dis.max() > 0
    assert not (out / ".mfs_partial").exists()


def test_member_disagreement_known_values():
    labels = np.array([[0, 1, 2], [0, 1, 1], [0, 2, 1]])  # 3 members, 3 voxels
    assert np.allclose(member_disagreement(labels), [0, 2 / 3, 2 / 3])
    assert np.allclose(member_disagreement(labels[:1]), 0)


def test_partial_overlap_skips_and_no_uncertainty_without_maps(tmp_path, properties):
    a = make_member(tmp_path / "a", properties, {"c1": random_probabilities(0), "c2": random_probabilities(2)})
    b = make_member(tmp_path / "b", properties, {"c1": random_probabilities(3)}, uncertainty=False)
    out = tmp_path / "ens"
    assert ensemble_folders([a, b], str(out), num_processes=0) == ["c1"]
    assert (out / "c1.nii.gz").is_file() and not (out / "c1.npz").exists() and not (out / "uncertainty").exists()


@pytest.mark.parametrize("problem, message", [
    ("no_common", "no case has a .npz in every input folder"),
    ("missing_pkl", ".pkl is missing"),
    ("shapes", "differ in shape"),
    ("labels", "other labels"),
    ("no_plans", "plans.json is missing"),
    ("one_folder", "at least 2 prediction folders"),
])
def test_bad_input_is_a_user_error(tmp_path, properties, problem, message):
    a = make_member(tmp_path / "a", properties, {"c1": random_probabilities(0)})
    cases = {"c2" if problem == "no_common" else "c1": random_probabilities(
        3, shape=(6, 7, 4) if problem == "shapes" else SHAPE)}
    b = make_member(tmp_path / "b", properties, cases, labels={"background": 0, "x": 1, "y": 2}
                    if problem == "labels" else LABELS)
    if problem == "missing_pkl":
        (b / "c1.pkl").unlink()
    if problem == "no_plans":
        (b / "plans.json").unlink()
        a, b = b, a
    folders = [a] if problem == "one_folder" else [a, b]
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        ensemble_folders(folders, str(tmp_path / "ens"), num_processes=0)
