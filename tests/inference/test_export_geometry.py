"""``write_map`` and ``revert_to_original_geometry`` in their 2D and 3D branches.

nnU-Net reads a 2D image as ``[C, 1, y, x]`` with a made-up first spacing; the maps we export must come back
in the input's geometry (SimpleITK ``sitk_stuff`` with 2-element spacing, or only ``spacing``), and a map in
preprocessed geometry must be reverted by the same resampling / uncropping / untransposing nnU-Net applies to
its probabilities (``convert_predicted_logits_to_segmentation_with_correct_shape``), which is the reference here.
"""
from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from scipy.ndimage import gaussian_filter

from medflowseg_nn.inference.export import revert_to_original_geometry, top_class_as, write_map

GEOMETRY = {2: dict(spacing=(0.7, 1.3), origin=(5.0, -2.0), direction=(0.0, 1.0, 1.0, 0.0)),
            3: dict(spacing=(0.9, 1.0, 1.2), origin=(10.0, -5.0, 3.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))}


def write_sitk(path, array, geometry) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry["spacing"])
    img.SetOrigin(geometry["origin"])
    img.SetDirection(geometry["direction"])
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("dim", [2, 3])
def test_write_map_keeps_the_simpleitk_geometry_of_the_input(tmp_path, dim):
    shape = (30, 40) if dim == 2 else (12, 14, 10)
    source = np.random.default_rng(0).random(shape).astype(np.float32)
    write_sitk(tmp_path / "in.nii.gz", source, GEOMETRY[dim])
    data, props = SimpleITKIO().read_images([str(tmp_path / "in.nii.gz")])
    assert data.shape == (1, *((1,) + shape if dim == 2 else shape))
    assert len(props["sitk_stuff"]["spacing"]) == dim
    volume = 2 * data[0]  # a map in the reader's array layout: [1, y, x] for 2D
    write_map(volume, str(tmp_path / "map.nii.gz"), props)

    out, ref = sitk.ReadImage(str(tmp_path / "map.nii.gz")), sitk.ReadImage(str(tmp_path / "in.nii.gz"))
    assert out.GetDimension() == dim and out.GetSize() == ref.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(out, get)(), getattr(ref, get)()), get
    assert out.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(sitk.GetArrayFromImage(out), 2 * source, atol=1e-6)
    # the same geometry nnU-Net's own writer gives the segmentation next to it
    SimpleITKIO().write_seg((volume > 1).astype(np.uint8), str(tmp_path / "seg.nii.gz"), props)
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert seg.GetSize() == out.GetSize() and np.allclose(seg.GetDirection(), out.GetDirection())


def test_write_map_2d_without_reader_geometry_uses_the_spacing(tmp_path):
    volume = np.random.default_rng(1).random((1, 30, 40)).astype(np.float32)
    write_map(volume, str(tmp_path / "map.nii.gz"), {"spacing": [999.0, 1.3, 0.7]})
    out = sitk.ReadImage(str(tmp_path / "map.nii.gz"))
    assert out.GetDimension() == 2 and out.GetSize() == (40, 30)
    assert np.allclose(out.GetSpacing(), (0.7, 1.3))
    assert np.array_equal(sitk.GetArrayFromImage(out), volume[0])


@pytest.mark.parametrize("io", [NibabelIO, NibabelIOWithReorient])
def test_write_map_keeps_the_nibabel_affine(tmp_path, io):
    affine = np.array([[-0.9, 0, 0, 10], [0, 0, 1.2, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])  # not RAS
    source = np.random.default_rng(2).random((12, 14, 10)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(source, affine), str(tmp_path / "in.nii.gz"))
    data, props = io().read_images([str(tmp_path / "in.nii.gz")])
    write_map(2 * data[0], str(tmp_path / "map.nii.gz"), props)
    out = nibabel.load(str(tmp_path / "map.nii.gz"))
    assert np.allclose(out.affine, affine, atol=1e-5)
    assert np.allclose(np.asarray(out.dataobj), 2 * source, atol=1e-6)


def plans_manager(dim: int, transpose_forward, spacing) -> PlansManager:
    backward = [int(i) for i in np.argsort(transpose_forward)]
    config = {"spacing": list(spacing), "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None},
              "patch_size": [8] * dim, "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor",
              "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}
    return PlansManager({"dataset_name": "Dataset000_X", "plans_name": "P",
                         "transpose_forward": list(transpose_forward), "transpose_backward": backward,
                         "configurations": {"c": config}})


CASES = {
    # nnU-Net 2D: [1, y, x], configuration spacing of 2 entries, the first spacing is the reader's fake one
    "2d": dict(dim=2, transpose=(0, 1, 2), config_spacing=(1.0, 1.0), spacing=[999.0, 0.5, 0.5],
               shape_before=(1, 30, 40), bbox=[[0, 1], [5, 25], [3, 35]], preprocessed=(1, 10, 16)),
    "3d_transposed": dict(dim=3, transpose=(2, 0, 1), config_spacing=(1.0, 1.0, 1.0), spacing=[0.5, 1.0, 2.0],
                          shape_before=(10, 16, 22), bbox=[[1, 9], [2, 14], [0, 20]], preprocessed=(16, 4, 12)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_revert_matches_what_nnunet_does_to_probabilities(name):
    case = CASES[name]
    pm = plans_manager(case["dim"], case["transpose"], case["config_spacing"])
    cm = pm.get_configuration("c")
    lm = pm.get_label_manager({"labels": {"background": 0, "fg": 1}, "channel_names": {"0": "x"},
                               "file_ending": ".nii.gz"})
    bbox = case["bbox"]
    props = {"spacing": case["spacing"], "shape_before_cropping": case["shape_before"], "bbox_used_for_cropping": bbox,
             "shape_after_cropping_and_before_resampling": [b - a for a, b in bbox]}
    rng = np.random.default_rng(3)
    m = gaussian_filter(rng.random(case["preprocessed"]), 1.0)
    m = ((m - m.min()) / (m.max() - m.min())).astype(np.float32)  # smooth, in [0, 1]
    reverted = revert_to_original_geometry(m, props, pm, cm)
    original_shape = tuple(np.array(case["shape_before"])[pm.transpose_backward])
    assert reverted.shape == original_shape and reverted.dtype == np.float32

    # nnU-Net on logits [0.5, m]: linear resampling keeps the constant channel, so p(fg) = sigmoid(r - 0.5)
    logits = np.stack([np.full_like(m, 0.5), m])
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, props, True)
    assert seg.shape == original_shape and probs.shape == (2, *original_shape)
    inside = np.zeros(case["shape_before"], bool)
    inside[tuple(slice(a, b) for a, b in bbox)] = True
    inside = inside.transpose(pm.transpose_backward)
    expected = np.log(probs[1][inside] / probs[0][inside]) + 0.5
    assert np.allclose(reverted[inside], expected, atol=1e-4)
    assert np.all(reverted[~inside] == 0) and 0 <= reverted.min() and reverted.max() <= 1
    agree = (reverted > 0.5) == (seg == 1)
    assert agree.mean() > 0.999 and (seg == 1).any() and (seg == 0)[inside].any()


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_top_class_as_the_segmentation_trades_only_the_disagreeing_voxels(spatial):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=spatial).astype(np.float32)
    probs = np.moveaxis(probs, -1, 0)
    seg = probs.argmax(0)
    assert top_class_as(seg, probs) is probs  # nothing to trade
    other = (seg + 1) % 3
    flip = rng.random(spatial) < 0.3
    target = np.where(flip, other, seg)
    traded = top_class_as(target, probs)
    assert np.array_equal(traded.argmax(0), target)
    assert np.array_equal(traded[:, ~flip], probs[:, ~flip])
    np.testing.assert_allclose(np.sort(traded, 0), np.sort(probs, 0))  # the same values per voxel, other places


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_top_class_as_breaks_exact_ties_for_the_segmentation(dtype):
    """Exact ties (a flat isotonic step) — the first index wins numpy's argmax, so swapping equal values is not
    enough: the segmentation's class is raised by one float step (seen in the suite: a barely trained model whose
    mapped probabilities tied at 1/3)."""
    probs = np.array([[0.4, 1 / 3, 0.5], [0.4, 1 / 3, 0.3], [0.2, 1 / 3, 0.2]], dtype=dtype)[:, :, None]  # [C, 3, 1]
    seg = np.array([[1], [2], [0]])
    traded = top_class_as(seg, probs)
    assert traded.dtype == dtype and np.array_equal(traded.argmax(0), seg)
    np.testing.assert_allclose(traded.sum(0), 1, atol=1e-3)
    assert np.array_equal(traded[:, 2], probs[:, 2])  # the voxel whose argmax already was the segmentation
