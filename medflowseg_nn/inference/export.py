"""Export of one predicted case: a pure function from logits (+ disagreement) to the arrays to write, and the
atomic writer.

:func:`case_arrays` turns what the sliding window returns (preprocessed geometry) into the input image's
geometry with nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` (segmentation and
probabilities) and :func:`revert_to_original_geometry` (entropy and disagreement maps, the same three steps);
benchmarks reuse it. :func:`write_case` writes a case's files atomically: each goes to ``<folder>/.mfs_partial/``
and is moved into place only when all are written, the segmentation last.

May be imported by the rest of ``medflowseg_nn.inference``, the CLIs and the benchmarks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from torch import Tensor

from medflowseg_nn.inference.uncertainty import predictive_entropy, region_entropy

ArrayLike = Union[np.ndarray, Tensor]
PARTIAL_DIR = ".mfs_partial"  #: outputs are written here first, then moved into place


@dataclass(frozen=True)
class CaseArrays:
    """A case's outputs in the input image's array layout (what nnU-Net's reader returned).

    ``segmentation [*S_orig]``; ``probabilities [C, *S_orig]`` (sum 1 over C; regions: one probability per
    region), ``entropy [*S_orig]`` (nats; regions: the sum of the per-region binary entropies) and
    ``disagreement [*S_orig]`` (0 … 1) float32, each ``None`` when not requested."""

    segmentation: np.ndarray
    probabilities: Optional[np.ndarray] = None
    entropy: Optional[np.ndarray] = None
    disagreement: Optional[np.ndarray] = None


def case_arrays(logits: ArrayLike, properties: dict, plans_manager, configuration_manager, label_manager,
                disagreement: Optional[ArrayLike] = None, with_probabilities: bool = False,
                with_entropy: bool = False, mapped: Optional[ArrayLike] = None) -> CaseArrays:
    """``logits [C, *S]`` (and ``disagreement [*S]``) in nnU-Net's preprocessed geometry → :class:`CaseArrays`.
    The label manager decides softmax or (regions) sigmoid and ``regions_class_order``, as in nnU-Net.
    ``mapped [C, *S]`` (:attr:`CasePrediction.mapped`): the probabilities and the entropy come from these logits,
    the segmentation from ``logits``."""
    def to_numpy(x: ArrayLike) -> np.ndarray:
        return x.cpu().numpy() if isinstance(x, Tensor) else x

    need_probs = with_probabilities or with_entropy
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        to_numpy(logits), plans_manager, configuration_manager, label_manager, properties,
        return_probabilities=need_probs and mapped is None)
    seg, probs = ret if need_probs and mapped is None else (ret, None)
    if need_probs and mapped is not None:
        probs = top_class_as(seg, convert_predicted_logits_to_segmentation_with_correct_shape(
            to_numpy(mapped), plans_manager, configuration_manager, label_manager, properties,
            return_probabilities=True)[1])
    dis = None if disagreement is None else revert_to_original_geometry(disagreement, properties, plans_manager,
                                                                        configuration_manager, (0, 1))
    entropy = None
    if with_entropy:
        entropy = region_entropy(probs) if label_manager.has_regions else predictive_entropy(probs)
    return CaseArrays(seg, probs if with_probabilities else None, entropy, dis)


def top_class_as(segmentation: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``probabilities [C, *S]`` whose argmax is ``segmentation [*S]`` (class indices): where another class is on
    top, its probability and the segmentation class's trade places. The mapped probabilities keep the argmax
    voxel by voxel, but nnU-Net's resampling interpolates them (not linear in the logits) and can tip a
    boundary voxel's near-tie the other way; nnU-Net's own exports (and ensembles of ``.npz`` files) rely on the
    ``.npz`` argmax being the segmentation. Where the segmentation class ties exactly with a class of lower index
    (a flat step of the isotonic map; the argmax takes the first), its probability is raised by one float step."""
    top = probabilities.argmax(0)
    seg = segmentation.astype(np.int64)
    if np.array_equal(top, seg):
        return probabilities
    out = np.array(probabilities, copy=True)
    p_top = np.take_along_axis(probabilities, top[None], 0)
    p_seg = np.take_along_axis(probabilities, seg[None], 0)
    np.put_along_axis(out, seg[None], p_top, 0)
    np.put_along_axis(out, top[None], p_seg, 0)
    tied = (out.argmax(0) != seg)[None]
    if tied.any():
        above = np.nextafter(p_top, np.array(np.inf, dtype=out.dtype))
        np.put_along_axis(out, seg[None], np.where(tied, above, p_top), 0)
    return out


def remove_empty_partial_dirs(folders) -> None:
    """Remove ``<folder>/.mfs_partial/`` of each folder when a run left it empty (files of interrupted cases
    stay, and are redone by the next run)."""
    for folder in folders:
        partial = os.path.join(folder, PARTIAL_DIR)
        if os.path.isdir(partial) and not os.listdir(partial):
            os.rmdir(partial)


def write_case(arrays: CaseArrays, paths: Mapping[str, str], properties: dict, write_seg,
               overlay=None) -> None:
    """Write the files named in ``paths`` (kinds ``entropy``, ``disagreement``, ``png``, ``npz``, ``pkl``,
    ``seg``; dict order, the segmentation last) atomically. ``write_seg(seg, path, properties)`` is the dataset's
    image writer; ``overlay(path, arrays)`` draws the PNG."""
    tmp = {kind: os.path.join(os.path.dirname(p), PARTIAL_DIR, os.path.basename(p)) for kind, p in paths.items()}
    try:
        for t in tmp.values():
            os.makedirs(os.path.dirname(t), exist_ok=True)
        if "entropy" in paths:
            write_map(arrays.entropy, tmp["entropy"], properties)
        if "disagreement" in paths:
            write_map(arrays.disagreement, tmp["disagreement"], properties)
        if "png" in paths:
            overlay(tmp["png"], arrays)
        if "npz" in paths:
            np.savez_compressed(tmp["npz"], probabilities=arrays.probabilities)
            save_pickle(properties, tmp["pkl"])
        write_seg(arrays.segmentation, tmp["seg"], properties)
        for kind, p in paths.items():
            os.replace(tmp[kind], p)
    finally:
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)


def revert_to_original_geometry(volume: ArrayLike, properties: dict, plans_manager,
                                configuration_manager, clip: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
    """A map ``[*S]`` in nnU-Net's preprocessed geometry → ``[*S_orig]`` in the input image's array layout.

    The same three steps nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` applies to
    probabilities: resample to the cropped original spacing (``resampling_fn_probabilities``), insert into the
    bounding box used for cropping (0 outside), revert the transpose. Values are clipped to ``clip`` (cubic
    resampling overshoots)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    volume = volume.cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target_shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(target_shape) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(volume[None].astype(np.float32), target_shape,
                                                                  current_spacing, spacing_transposed)
    resampled = resampled.cpu().numpy() if isinstance(resampled, Tensor) else np.asarray(resampled)
    resampled = np.clip(resampled[0].astype(np.float32), *clip)
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(np.asarray(full).transpose(plans_manager.transpose_backward))


def write_map(volume: np.ndarray, path: str, properties: dict) -> None:
    """Write a float map ``[*S_orig]`` (the layout nnU-Net's reader returned, as the exported segmentation has)
    as NIfTI with the input's geometry, taken from the reader's entry in ``properties`` like ``write_seg``
    does (SimpleITK ``sitk_stuff`` or nibabel ``nibabel_stuff``; otherwise only the spacing is known)."""
    volume = np.asarray(volume, dtype=np.float32)
    if "nibabel_stuff" in properties:
        import nibabel
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        stuff = properties["nibabel_stuff"]
        image = nibabel.Nifti1Image(volume.transpose((2, 1, 0)), affine=stuff.get("reoriented_affine",
                                                                                   stuff["original_affine"]))
        if "reoriented_affine" in stuff:  # NibabelIOWithReorient: back from RAS to the original orientation
            image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), io_orientation(stuff["original_affine"])))
        nibabel.save(image, path)
        return
    import SimpleITK as sitk

    geometry = properties.get("sitk_stuff")
    if geometry is not None and len(geometry["spacing"]) == 2 or geometry is None and volume.shape[0] == 1:
        volume = volume[0]  # 2D images are [1, y, x] in nnU-Net
    image = sitk.GetImageFromArray(volume)
    if geometry is not None:
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
    else:
        image.SetSpacing([float(s) for s in properties["spacing"][-volume.ndim:]][::-1])
    sitk.WriteImage(image, path, useCompression=True)
