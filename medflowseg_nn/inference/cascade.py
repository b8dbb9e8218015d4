"""The cascade at prediction time: the previous stage's segmentations as extra input channels.

nnU-Net's ``3d_cascade_fullres`` (``previous_stage: 3d_lowres`` in the plans) sees the image channels plus the
one-hot foreground labels of the ``3d_lowres`` prediction of the same case (``determine_num_input_channels``);
the vector field then adds its x_t channels (see :func:`medflowseg_nn.model.build_vector_field`). At prediction
the previous stage's folder (``mfs_predict -prev_stage_predictions DIR``, nnU-Net's flag) holds ``CASE<ending>``
per case, as nnU-Net's ``predict_from_files(folder_with_segs_from_prev_stage=...)`` expects; nnU-Net's
preprocessor resamples and crops it with the image, and its one-hot foreground labels are appended to the image
channels, exactly as nnU-Net's data iterators do.

May be imported by the CLIs and ``medflowseg_nn.inference.runner``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from medflowseg_nn.errors import UserError

#: ``mfs_predict``'s flag (nnU-Net's name)
PREV_STAGE_FLAG = "-prev_stage_predictions"


def previous_stage(configuration_manager: Any) -> Optional[str]:
    """The configuration whose predictions this one takes as input (``None`` unless it is a cascade stage)."""
    return configuration_manager.previous_stage_name


def previous_stage_files(cases: Sequence[str], folder: Optional[str], file_ending: str,
                         configuration_manager: Any) -> Optional[list[str]]:
    """Per case, the previous stage's segmentation ``folder/CASE<ending>`` (``None`` when not a cascade).

    Raises :class:`UserError` when a cascade stage gets no folder, or a non-cascade stage gets one."""
    prev = previous_stage(configuration_manager)
    if prev is None:
        if folder is not None:
            raise UserError(f"{PREV_STAGE_FLAG} is only for cascade configurations (3d_cascade_fullres); this "
                            f"model's configuration takes no previous stage — drop the flag")
        return None
    if folder is None:
        raise UserError(f"this model is a cascade stage: pass {PREV_STAGE_FLAG} DIR with the {prev} predictions "
                        f"of these cases (mfs_predict ... -c {prev} -o DIR)")
    if not os.path.isdir(folder):
        raise UserError(f"{PREV_STAGE_FLAG} folder {folder} does not exist")
    return [os.path.join(folder, c + file_ending) for c in cases]


def missing_previous_stage(case: str, path: Optional[str]) -> list[str]:
    """Problems (one line) when a cascade case has no previous-stage segmentation; [] otherwise."""
    if path is None or os.path.isfile(path):
        return []
    return [f"{os.path.basename(path)}: no previous-stage segmentation for {case} in {os.path.dirname(path)} — "
            f"predict the case with the previous stage first"]


def append_previous_stage(data: np.ndarray, seg: np.ndarray, foreground_labels: Sequence[int]) -> np.ndarray:
    """``data [C_img, *S]`` and the preprocessed previous-stage segmentation ``seg [1, *S]`` →
    ``[C_img + len(foreground_labels), *S]``: the image channels, then one channel per foreground label (nnU-Net's
    data iterators do the same)."""
    return np.vstack((data, convert_labelmap_to_one_hot(seg[0], foreground_labels, data.dtype)))
