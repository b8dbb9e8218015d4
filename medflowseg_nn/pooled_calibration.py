"""One calibration for all folds of a model, fitted on its pooled cross-validation.

After training, each fold's ``temperature.json`` (:mod:`medflowseg_nn.temperature`: T, then the top-label map) is
fitted on that fold's own validation cases — a fifth of the training data, e.g. 32 Hippocampus cases. Those few
cases decide T noticeably: the three folds of a model fit T from 1.63 to 1.83 on the 2d protocol of issue #9. Pooling
the final validations of all folds (each case predicted by the fold model that did not train on it, as nnU-Net's
``accumulate_cv_results`` pools the segmentations) gives one fit on every training case, which
:func:`write_pooled_calibration` writes into every fold; ``mfs_predict`` applies it as before. Measured
(``benchmarks/RESULTS.md``, 2026-12-06 15:42): a fold-0 model's test ROI ECE after T + map 0.0110 → 0.0075
(ours, 4 seeds, three folds pooled) and 0.0108 → 0.0059 (nnU-Net's models, the same step), the fold ensembles'
unchanged (0.0024 → 0.0024, 0.0029 → 0.0031).

Each fold's own fit is kept as ``temperature_own_fold.json`` (refreshed when the fold was validated and fitted
again); :func:`restore_own_fold_calibration` puts it back. The folds must hold their validation probabilities
(``mfs_train ... --npz``, or ``--val --npz`` afterwards) and own fits for the same sampler settings. Imports no
nnunetv2.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional, Sequence

from medflowseg_nn.errors import UserError
from medflowseg_nn.temperature import (TEMPERATURE_FILE, FoldCalibration, fit_calibration_on_folders,
                                       fitted_on, save_temperature)

__all__ = ["OWN_FOLD_FILE", "fit_pooled_calibration", "write_pooled_calibration", "restore_own_fold_calibration"]
logger = logging.getLogger(__name__)
OWN_FOLD_FILE = "temperature_own_fold.json"


def _read(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        return json.load(open(path))
    except ValueError as e:
        raise UserError(f"{path} is not a temperature file ({e}); refit it with `mfs_train ... --val --npz`") \
            from None


def _is_pooled(content: Optional[dict]) -> bool:
    return "pooled_folds" in fitted_on(content)


def _own_fit(fold_folder: str) -> dict:
    """The fold's own fit: its ``temperature.json`` unless that holds a pooled fit, else the kept copy."""
    current = _read(os.path.join(fold_folder, TEMPERATURE_FILE))
    own = current if current is not None and not _is_pooled(current) else \
        _read(os.path.join(fold_folder, OWN_FOLD_FILE))
    if own is None:
        raise UserError(f"{fold_folder} has no {TEMPERATURE_FILE}: its final validation fitted none (a "
                        f"region-based dataset, or a trainer with fit_temperature off) — nothing to pool")
    if own.get("member_maps"):
        raise UserError(f"{fold_folder} is a packed ensemble calibrated member by member (member_maps in its "
                        f"{TEMPERATURE_FILE}); one pooled T + map of the average would replace that and was measured "
                        f"worse (benchmarks/RESULTS.md 2026-12-06 20:17) — nothing to pool")
    return own


def _validation(fold_folder: str) -> str:
    folder = os.path.join(fold_folder, "validation")
    if not os.path.isdir(folder) or not any(f.endswith(".npz") for f in os.listdir(folder)):
        raise UserError(f"{folder} has no .npz probabilities to pool — rerun the fold's validation with them "
                        f"(`mfs_train DATASET CONFIGURATION FOLD --val --npz`)")
    return folder


def fit_pooled_calibration(fold_folders: Sequence[str], gt_folder: str, file_ending: str = ".nii.gz",
                           roi_dilation: int = 3, ignore_label: Optional[int] = None,
                           top_label_map: bool = True) -> tuple[FoldCalibration, dict]:
    """T and the top-label map (:func:`~medflowseg_nn.temperature.fit_calibration_on_folders`) on the
    ROI voxels of every ``FOLD/validation/CASE.npz`` of ``fold_folders`` (≥ 2) against ``gt_folder``, at most 2
    million voxels (a seeded subsample). Returns the fit and its ``fitted_on`` description, which names the folds
    and the sampler settings all their own fits were made for (different settings are a :class:`UserError`)."""
    folders = [os.path.abspath(f) for f in fold_folders]
    if len(set(folders)) < 2:
        raise UserError(f"a pooled calibration needs at least two distinct folds, got {list(fold_folders)}")
    samplers = [fitted_on(_own_fit(f)).get("sampler") for f in folders]
    if any(s != samplers[0] for s in samplers):
        raise UserError("the folds' own calibrations were fitted for different sampler settings ("
                        + "; ".join(f"{os.path.basename(f)}: {s}" for f, s in zip(folders, samplers))
                        + ") — rerun their validations with the same settings")
    checkpoints = [fitted_on(_own_fit(f)).get("checkpoint") for f in folders]
    if any(c != checkpoints[0] for c in checkpoints):
        raise UserError("the folds' validations were made with the weights of different checkpoints ("
                        + "; ".join(f"{os.path.basename(f)}: {c}" for f, c in zip(folders, checkpoints))
                        + ") — rerun them with the same (mfs_train --val, or --val_best for every fold)")
    calibration, info = fit_calibration_on_folders([_validation(f) for f in folders], gt_folder, file_ending,
                                                   roi_dilation, ignore_label=ignore_label,
                                                   top_label_map=top_label_map)
    cases = info["cases"]
    if len(set(cases)) != len(cases):
        logger.warning("%d case(s) are in the validation of more than one fold: they count once per fold",
                       len(cases) - len(set(cases)))
    info = {**info, "pooled_folds": folders, "sampler": samplers[0],
            **({"checkpoint": checkpoints[0]} if checkpoints[0] is not None else {})}
    logger.info("pooled calibration: T %.4f on %d cases of %d folds", calibration.temperature, len(cases),
                len(folders))
    return calibration, info


def write_pooled_calibration(fold_folders: Sequence[str], calibration: FoldCalibration, info: dict) -> list[str]:
    """Write ``calibration`` as every fold's ``temperature.json``, the fold's own fit kept first as
    ``temperature_own_fold.json`` (refreshed when ``temperature.json`` holds an own fit, e.g. after ``mfs_train
    --val``; left as it is when it holds an earlier pooled fit). Returns the files written."""
    written = []
    for folder in fold_folders:
        current = os.path.join(folder, TEMPERATURE_FILE)
        content = _read(current)
        if content is not None and not _is_pooled(content):
            shutil.copyfile(current, os.path.join(folder, OWN_FOLD_FILE))
        elif not os.path.isfile(os.path.join(folder, OWN_FOLD_FILE)):
            raise UserError(f"{folder} has no own-fold calibration to keep ({TEMPERATURE_FILE} missing)")
        written.append(save_temperature(folder, calibration.temperature, info, calibration.top_label_map))
    return written


def restore_own_fold_calibration(fold_folders: Sequence[str]) -> list[str]:
    """Put each fold's own fit (``temperature_own_fold.json``) back as its ``temperature.json`` where that holds a
    pooled fit; returns the folds restored (the others are left as they are, logged)."""
    restored = []
    for folder in fold_folders:
        own, current = os.path.join(folder, OWN_FOLD_FILE), os.path.join(folder, TEMPERATURE_FILE)
        if not os.path.isfile(own) or not _is_pooled(_read(current)):
            logger.info("%s holds no pooled calibration with a kept own fit: left as it is", folder)
            continue
        os.replace(own, current)
        restored.append(folder)
    return restored
