"""Tests for medflowseg_nn.dataset_checks.verify_raw_dataset (pre-planning dataset integrity checks)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medflowseg_nn.dataset_checks import DatasetIntegrityError, verify_raw_dataset

SHAPE = (8, 10, 12)  # numpy (z, y, x) -> SimpleITK size (12, 10, 8)
SPACING = (0.8, 0.9, 1.5)
ORIGIN = (10.0, -5.0, 3.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
CASES = ("case_000", "case_001", "case_002")
REAL_DATA = Path(os.environ.get("MFS_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def _write(arr: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> None:
    img = sitk.GetImageFromArray(arr)
    if arr.ndim == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def _label(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=shape).astype(np.uint8)


def _image(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def make_dataset(root: Path, n_channels: int = 1, labels: dict | None = None, ending: str = ".nii.gz") -> Path:
    """Write a tiny valid 3D nnU-Net raw dataset (3 cases, labels 0/1/2) into ``root`` and return it."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, case in enumerate(CASES):
        for c in range(n_channels):
            _write(_image(seed=10 * i + c), root / "imagesTr" / f"{case}_{c:04d}{ending}")
        _write(_label(seed=i), root / "labelsTr" / f"{case}{ending}")
    dataset_json = {"channel_names": {str(c): f"MR{c}" for c in range(n_channels)},
                    "labels": labels or {"background": 0, "a": 1, "b": 2},
                    "numTraining": len(CASES), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(dataset_json))
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _edit_json(root: Path, **changes) -> None:
    data = json.loads((root / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    (root / "dataset.json").write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


IMG1, LAB1 = "imagesTr/case_001_0000.nii.gz", "labelsTr/case_001.nii.gz"

# name -> (corruption, expected words that must appear together in one problem line)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "label_size": (lambda r: _write(_label((8, 10, 11)), r / LAB1), ("case_001", "size", "(11, 10, 8)")),
    "label_spacing": (lambda r: _write(_label(), r / LAB1, spacing=(0.8, 0.9, 3.0)), ("case_001", "spacing")),
    "label_origin": (lambda r: _write(_label(), r / LAB1, origin=(0.0, 0.0, 0.0)), ("case_001", "origin")),
    "label_direction": (lambda r: _write(_label(), r / LAB1, direction=tuple(np.eye(3).ravel())),
                        ("case_001", "direction")),
    "undeclared_label_value": (lambda r: _write(np.where(_label() == 2, 5, _label()).astype(np.uint8), r / LAB1),
                               ("case_001", "label values", "[5]")),
    "float_label_fraction": (lambda r: _write(_label().astype(np.float32) * 0.5, r / LAB1),
                             ("case_001", "label values", "0.5")),
    "nan_in_image": (lambda r: _write(np.where(_image() > 1, np.nan, _image()).astype(np.float32), r / IMG1),
                     ("case_001_0000.nii.gz", "NaN")),
    "inf_in_image": (lambda r: _write(np.where(_image() > 1, np.inf, _image()).astype(np.float32), r / IMG1),
                     ("case_001_0000.nii.gz", "Inf")),
    "image_is_2d_slice": (lambda r: _write(_image()[0], r / IMG1), ("case_001", "dimension")),
    "case_with_singleton_axis": (lambda r: (_write(_image((1, 10, 12)), r / IMG1),
                                            _write(_label((1, 10, 12)), r / LAB1)), ("case_001", "dimension", "2D")),
    "truncated_image": (lambda r: _truncate(r / IMG1), ("case_001_0000.nii.gz", "unreadable")),
    "truncated_label": (lambda r: _truncate(r / LAB1), ("case_001.nii.gz", "unreadable")),
    "garbage_label": (lambda r: (r / LAB1).write_bytes(b"not an image"), ("case_001.nii.gz", "unreadable")),
    "missing_label": (lambda r: (r / LAB1).unlink(), ("case_001", "no label file")),
    "missing_image": (lambda r: (r / IMG1).unlink(), ("case_001.nii.gz", "no image files")),
    "extra_channel_file": (lambda r: _write(_image(), r / "imagesTr/case_001_0001.nii.gz"),
                           ("case_001_0001.nii.gz", "unexpected channel")),
    "no_channel_suffix": (lambda r: (r / IMG1).rename(r / "imagesTr/case_001.nii.gz"),
                          ("case_001.nii.gz", "channel suffix")),
    "dataset_json_missing": (lambda r: (r / "dataset.json").unlink(), ("dataset.json", "not found")),
    "dataset_json_invalid": (lambda r: (r / "dataset.json").write_text('{"labels": {'), ("dataset.json", "JSON")),
    "dataset_json_missing_key": (lambda r: _edit_json(r, numTraining=None), ("dataset.json", "'numTraining'")),
    "dataset_json_no_channels": (lambda r: _edit_json(r, channel_names=None), ("dataset.json", "channel_names")),
    "dataset_json_no_background": (lambda r: _edit_json(r, labels={"bg": 0, "a": 1, "b": 2}),
                                   ("dataset.json", "background")),
    "dataset_json_labels_gap": (lambda r: _edit_json(r, labels={"background": 0, "a": 1, "b": 3}),
                                ("dataset.json", "consecutive")),
    "num_training_mismatch": (lambda r: _edit_json(r, numTraining=5), ("dataset.json", "numTraining", "3")),
    "wrong_file_ending": (lambda r: _edit_json(r, file_ending=".nrrd"), ("imagesTr", "file_ending")),
    "images_folder_missing": (lambda r: [p.unlink() for p in (r / "imagesTr").iterdir()] and
                              (r / "imagesTr").rmdir(), ("imagesTr", "folder missing")),
}


def _assert_fails(root: Path, expected: tuple[str, ...], num_processes: int = 1) -> DatasetIntegrityError:
    before = _snapshot(root)
    with pytest.raises(DatasetIntegrityError) as info:
        verify_raw_dataset(root, num_processes=num_processes)
    assert _snapshot(root) == before, "verify_raw_dataset must not create, modify or delete files"
    err = info.value
    assert err.problems and str(err).splitlines()[1:] == err.problems
    assert all("\n" not in p and " — " in p for p in err.problems), err.problems
    matching = [p for p in err.problems if all(word in p for word in expected)]
    assert matching, f"no problem line contains {expected}:\n{err}"
    return err


def test_valid_dataset_passes(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    before = _snapshot(root)
    verify_raw_dataset(root)
    verify_raw_dataset(str(root))
    assert _snapshot(root) == before


@pytest.mark.parametrize("labels", [
    {"background": 0, "whole": [1, 2], "core": 2},  # region-based
    {"background": 0, "a": 1, "b": 2, "ignore": 3},  # ignore label (unused in the files is fine)
], ids=["regions", "ignore_label"])
def test_valid_label_variants_pass(tmp_path: Path, labels: dict) -> None:
    verify_raw_dataset(make_dataset(tmp_path / "ds", labels=labels))


def test_ignore_label_value_is_allowed(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", labels={"background": 0, "a": 1, "b": 2, "ignore": 3})
    _write(np.where(_label() == 2, 3, _label()).astype(np.uint8), root / LAB1)
    verify_raw_dataset(root)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_single_corruption_is_reported(tmp_path: Path, name: str) -> None:
    corrupt, expected = CORRUPTIONS[name]
    root = make_dataset(tmp_path / "ds")
    corrupt(root)
    _assert_fails(root, expected)


def test_all_problems_are_collected_and_pool_path_works(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    _write(_label((8, 10, 11)), root / LAB1)
    _write(np.full(SHAPE, np.nan, np.float32), root / "imagesTr/case_002_0000.nii.gz")
    err = _assert_fails(root, ("case_001", "size"), num_processes=2)
    assert any("case_002_0000.nii.gz" in p and "NaN" in p for p in err.problems)
    assert str(err).splitlines()[0].startswith("Dataset") and "2 problem(s)" in str(err).splitlines()[0]


@pytest.mark.parametrize("corrupt,expected", [
    (lambda r: (r / "imagesTr/case_001_0001.nii.gz").unlink(), ("case_001", "missing channel", "case_001_0001.nii.gz")),
    (lambda r: _write(_image((8, 10, 11)), r / "imagesTr/case_001_0001.nii.gz"), ("case_001_0001.nii.gz", "size")),
    (lambda r: _write(_image(), r / "imagesTr/case_001_0001.nii.gz", spacing=(1.0, 1.0, 1.0)),
     ("case_001_0001.nii.gz", "spacing")),
], ids=["missing_channel", "channel_size", "channel_spacing"])
def test_two_channel_dataset(tmp_path: Path, corrupt: Callable[[Path], None], expected: tuple[str, ...]) -> None:
    root = make_dataset(tmp_path / "ds", n_channels=2)
    verify_raw_dataset(root)
    corrupt(root)
    _assert_fails(root, expected)


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".nii"])
def test_other_simpleitk_formats(tmp_path: Path, ending: str) -> None:
    root = make_dataset(tmp_path / "ds", ending=ending)
    verify_raw_dataset(root)
    _write(np.where(_image() > 1, np.nan, _image()).astype(np.float32), root / f"imagesTr/case_000_0000{ending}")
    _write(_label(), root / f"labelsTr/case_001{ending}", origin=(1.0, 2.0, 3.0))
    _truncate(root / f"labelsTr/case_002{ending}")
    err = _assert_fails(root, (f"case_000_0000{ending}", "NaN"))
    assert any("case_001" in p and "origin" in p for p in err.problems), str(err)
    assert any(f"case_002{ending}" in p and "unreadable" in p for p in err.problems), str(err)


def make_png_dataset(root: Path, rgb: bool = True) -> Path:
    """Write a tiny valid 2D natural-image dataset (RGB PNGs = 3 channels in one file, grayscale label PNGs)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for case in CASES:
        shape = (16, 20, 3) if rgb else (16, 20)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / f"imagesTr/{case}_0000.png")
        Image.fromarray(rng.integers(0, 2, size=(16, 20), dtype=np.uint8)).save(root / f"labelsTr/{case}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "vessel": 1},
        "numTraining": len(CASES), "file_ending": ".png"}))
    return root


def test_png_dataset_passes(tmp_path: Path) -> None:
    verify_raw_dataset(make_png_dataset(tmp_path / "ds"))


def test_png_label_size_mismatch(tmp_path: Path) -> None:
    root = make_png_dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((16, 21), np.uint8)).save(root / "labelsTr/case_001.png")
    _assert_fails(root, ("case_001", "size", "(16, 21)"))


def test_png_grayscale_images_but_three_channels_declared(tmp_path: Path) -> None:
    _assert_fails(make_png_dataset(tmp_path / "ds", rgb=False), ("case_000", "channel count mismatch"))


@pytest.mark.parametrize("name", ["Dataset004_Hippocampus", "Dataset120_RetinaVessels"])
def test_real_datasets_pass(name: str) -> None:
    folder = REAL_DATA / name
    if not (folder / "dataset.json").is_file():
        pytest.skip(f"real dataset not available at {folder} (set MFS_SHARED_DATA)")
    verify_raw_dataset(folder)
