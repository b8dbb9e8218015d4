"""NIfTI completeness from header and size, and the prediction-input check that uses it instead of decoding."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.dataset_checks import check_case
from medflowseg_nn.nifti_integrity import nifti_payload_complete


def write(path, array: np.ndarray) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_complete_files_are_vouched_for_and_truncated_ones_are_not(tmp_path, ending):
    rng = np.random.default_rng(0)
    path = write(tmp_path / f"a{ending}", rng.normal(size=(20, 30, 25)).astype(np.float32))
    assert nifti_payload_complete(path) is True
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 9):
        bad = tmp_path / f"cut{cut}{ending}"
        bad.write_bytes(data[:cut])
        assert nifti_payload_complete(str(bad)) is None  # cannot vouch: the caller decodes the voxels


def test_other_formats_and_broken_headers_are_left_to_the_full_read(tmp_path):
    assert nifti_payload_complete(write(tmp_path / "a.mha", np.zeros((4, 4, 4), np.uint8))) is None
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    assert nifti_payload_complete(str(tmp_path / "junk.nii.gz")) is None


def test_prediction_check_skips_decoding_complete_files_but_still_catches_truncation(tmp_path):
    arr = np.ones((10, 12, 8), np.float32)
    arr[3, 4, 5] = np.nan
    good = write(tmp_path / "good_0000.nii.gz", arr)
    full, _ = check_case(case="good", image_paths=[good])
    fast, _ = check_case(case="good", image_paths=[good], read_voxels=False)
    assert any("NaN" in p for p in full)  # decoded: the NaN is found
    assert fast == []  # not decoded: header and size only
    data = open(good, "rb").read()
    (tmp_path / "cut_0000.nii.gz").write_bytes(data[: len(data) // 2])
    problems, _ = check_case(case="cut", image_paths=[str(tmp_path / "cut_0000.nii.gz")], read_voxels=False)
    assert len(problems) == 1 and "unreadable image file" in problems[0]
