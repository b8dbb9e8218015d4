"""Temperature scaling of predicted class probabilities (Guo et al. 2017), fitted on validation cases.

One scalar T > 0 for a model: ``p_T = softmax(log p / T)`` (T > 1 softens, T < 1 sharpens; the argmax, hence the
segmentation and its Dice, never changes). It is fitted by minimising the mean negative log-likelihood of the
reference labels over the validation voxels that the caller selects (e.g. the reference ROI of
:func:`medflowseg_nn.calibration.reference_roi`, so that the background far from any structure does not dominate).
Working on probabilities rather than logits is exact for everything nnU-Net exports: its probabilities are the
softmax of the logits the sliding window accumulated, and ``log softmax(z) = z - const`` per voxel.

Own code rather than a library: torchmetrics and MONAI measure calibration but fit no temperature; the fit is a
1-D bounded minimisation (``scipy.optimize.minimize_scalar`` over log T). Imports no nnunetv2.

A fold's ``temperature.json`` may also hold a top-label isotonic map fitted after T
(:mod:`medflowseg_nn.recalibration`); :class:`FoldCalibration` is both, as the predictor applies them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from medflowseg_nn.errors import UserError
from medflowseg_nn.recalibration import (TopLabelMap, apply_top_label_map, apply_top_label_map_np,
                                         cap_rows, top_label_map_of_rows, voxel_rows)

__all__ = ["apply_temperature", "fit_temperature", "temperature_of_rows", "fit_calibration", "calibration_of_rows",
           "fit_calibration_on_folder", "fit_calibration_on_folders", "fit_validation_temperature", "save_temperature",
           "load_calibration", "fitted_on", "FoldCalibration", "TEMPERATURE_FILE", "T_BOUNDS"]
logger = logging.getLogger(__name__)
TEMPERATURE_FILE = "temperature.json"
T_BOUNDS = (0.05, 20.0)
_EPS = 1e-12


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, _EPS, None))


def apply_temperature(probabilities: np.ndarray, temperature: float, axis: int = 0) -> np.ndarray:
    """``probabilities`` [C, *S] (summing to 1 over ``axis``) → ``softmax(log p / T)`` of the same shape, float32."""
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    z = _log(np.asarray(probabilities, dtype=np.float64)) / temperature
    z -= z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class FoldCalibration:
    """What a fold's ``temperature.json`` holds: T, and optionally the top-label map fitted after it. A packed
    ensemble's file holds ``member_maps`` instead (one top-label map per member, fitted after the member's own T,
    which the network holds: :mod:`medflowseg_nn.trainers.member_temperatures`), with T = 1 and no map on the
    average: the predictor maps each member before averaging (:mod:`medflowseg_nn.inference.member_calibration`)."""

    temperature: float
    top_label_map: Optional[TopLabelMap] = None
    member_maps: tuple[TopLabelMap, ...] = ()

    def __post_init__(self) -> None:
        if self.member_maps and (self.temperature != 1.0 or self.top_label_map is not None):
            raise UserError("a calibration with member maps has T = 1 and no map of the average (each member is "
                            "tempered and mapped before the average)")

    @property
    def summary(self) -> str:
        """One line for logs: ``T 1.630 + map`` (the knots left out)."""
        extra = " + map" if self.top_label_map is not None else \
            f" + {len(self.member_maps)} member maps" if self.member_maps else ""
        return f"T {self.temperature:.3f}{extra}"

    def probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """``[C, *S]`` probabilities → recalibrated ones (T, then the map), float32. Member maps cannot be applied to
        an average (the predictor applies them member by member): refused."""
        if self.member_maps:
            raise UserError("member maps apply to each member before the average "
                            "(medflowseg_nn.inference.member_calibration), not to averaged probabilities")
        p = apply_temperature(probabilities, self.temperature)
        return p if self.top_label_map is None else apply_top_label_map_np(p, self.top_label_map)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """``[C, *S]`` logits → ``logits / T`` in float32 (float16 logits divided and rounded back could tie and
        move the argmax): the same argmax."""
        return logits.float() / self.temperature

    def mapped(self, scaled: torch.Tensor) -> Optional[torch.Tensor]:
        """:meth:`scaled` logits ``[C, *S]`` → float32 logits whose softmax is the mapped probabilities (the log of
        :func:`~medflowseg_nn.recalibration.apply_top_label_map`); ``None`` without a map."""
        if self.top_label_map is None:
            return None
        return torch.log(apply_top_label_map(torch.softmax(scaled.float(), 0), self.top_label_map).clamp_min(_EPS))


def _nll(log_p: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``labels`` [N] under ``softmax(log_p / T)``; ``log_p`` [N, C]."""
    z = log_p / temperature
    z = z - z.max(1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    masks: Optional[Sequence[np.ndarray]] = None, seed: int = 0) -> float:
    """The T in :data:`T_BOUNDS` minimising the mean NLL over the selected voxels of all cases.

    ``probabilities[i]`` [C, *S_i]; ``labels[i]`` [*S_i] integers in 0..C-1; ``masks[i]`` [*S_i] bool (all voxels
    when ``None``). At most 2 million voxels enter the fit (a seeded uniform subsample)."""
    return temperature_of_rows(*voxel_rows(probabilities, labels, masks, seed, "fit_temperature"))


def temperature_of_rows(p_all: np.ndarray, y_all: np.ndarray) -> float:
    """:func:`fit_temperature` on voxels already selected (:func:`voxel_rows`): ``p_all [N, C]``, ``y_all [N]``."""
    log_p = _log(p_all.astype(np.float64))
    res = minimize_scalar(lambda s: _nll(log_p, y_all, float(np.exp(s))), bounds=np.log(T_BOUNDS),
                          method="bounded", options={"xatol": 1e-4})
    temperature = float(np.exp(res.x))
    logger.info("temperature %.4f (NLL %.4f at T = 1 -> %.4f) on %d voxels", temperature,
                _nll(log_p, y_all, 1.0), float(res.fun), len(y_all))
    return temperature


def fit_calibration(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    masks: Optional[Sequence[np.ndarray]] = None, top_label_map: bool = True) -> FoldCalibration:
    """:func:`fit_temperature`, then (``top_label_map``) the top-label map on the tempered probabilities of the same
    voxels (arguments as :func:`fit_temperature`): the voxels are selected once, and only they are tempered."""
    rows, y = voxel_rows(probabilities, labels, masks, 0, "fit_calibration")
    return calibration_of_rows(rows, y, top_label_map)


def calibration_of_rows(rows: np.ndarray, y: np.ndarray, top_label_map: bool = True) -> FoldCalibration:
    """:func:`fit_calibration` on voxels already selected: probabilities ``rows [N, C]``, labels ``y [N]``."""
    temperature = temperature_of_rows(rows, y)
    mapped = top_label_map_of_rows(apply_temperature(rows, temperature, axis=1), y) if top_label_map else None
    return FoldCalibration(temperature, mapped)


def fit_calibration_on_folder(prob_dir: str, ref_dir: str, file_ending: str = ".nii.gz", roi_dilation: int = 3,
                              max_cases: Optional[int] = None, ignore_label: Optional[int] = None,
                              top_label_map: bool = True) -> tuple[FoldCalibration, dict]:
    """Fit T on every ``prob_dir/CASE.npz`` (nnU-Net's ``probabilities`` [C, *S], e.g. a fold's final validation
    with ``--npz``) against ``ref_dir/CASE{file_ending}``, in each reference's ROI (foreground dilated by
    ``roi_dilation`` voxels; voxels with ``ignore_label`` left out), then (``top_label_map``) the top-label map on
    the tempered probabilities in the same voxels. Returns them and a JSON-ready description."""
    calibration, info = fit_calibration_on_folders([prob_dir], ref_dir, file_ending, roi_dilation, max_cases,
                                                   ignore_label, top_label_map)
    return calibration, {**info, "probabilities": info["probabilities"][0]}


def fit_calibration_on_folders(prob_dirs: Sequence[str], ref_dir: str, file_ending: str = ".nii.gz",
                               roi_dilation: int = 3, max_cases: Optional[int] = None,
                               ignore_label: Optional[int] = None,
                               top_label_map: bool = True) -> tuple[FoldCalibration, dict]:
    """:func:`fit_calibration_on_folder` on the cases of several folders at once (``max_cases`` per folder), e.g.
    every fold's final validation: the pooled cross-validation. The description lists the folders."""
    from medflowseg_nn.calibration_folder import folder_rows
    got = [folder_rows(d, ref_dir, file_ending, roi_dilation, ignore_label, max_cases) for d in prob_dirs]
    y = np.concatenate([labels for _, labels, _ in got])
    if len(y) == 0:
        raise UserError(f"fit_calibration_on_folders: no voxel selected in {', '.join(prob_dirs)}")
    rows = np.concatenate([r for r, _, _ in got])
    return calibration_of_rows(*cap_rows(rows, y), top_label_map), {
        "cases": [c for _, _, cases in got for c in cases], "roi_dilation": roi_dilation,
        "objective": "NLL in the reference ROI",
        "top_label_map": "isotonic, after T, in the reference ROI" if top_label_map else None,
        "probabilities": [os.path.abspath(d) for d in prob_dirs]}


def fit_validation_temperature(fold_folder: str, gt_folder: str, file_ending: str, sampler: dict,
                               ignore_label: Optional[int] = None, keep_probabilities: bool = False,
                               checkpoint: Optional[str] = None) -> float:
    """After a fold's final validation with probabilities (``fold_folder/validation/CASE.npz``): fit T and the
    top-label map after it against ``gt_folder``, save them with the ``sampler`` settings and the ``checkpoint``
    file whose weights made the validation (when known) they hold for (``fold_folder/temperature.json``) and,
    unless ``keep_probabilities``, remove the ``.npz`` / ``.pkl`` files the validation wrote for it. Returns T."""
    validation = os.path.join(fold_folder, "validation")
    calibration, info = fit_calibration_on_folder(validation, gt_folder, file_ending, ignore_label=ignore_label)
    save_temperature(fold_folder, calibration.temperature, {**info, "sampler": sampler}, calibration.top_label_map,
                     checkpoint=checkpoint)
    if not keep_probabilities:
        for name in os.listdir(validation):
            if name.endswith((".npz", ".pkl")):
                os.remove(os.path.join(validation, name))
    logger.info("fold temperature %.3f and top-label map fitted on %d validation cases (%s)",
                calibration.temperature, len(info["cases"]), sampler)
    return calibration.temperature


def save_temperature(folder: str, temperature: float, fitted_on: dict,
                     top_label_map: Optional[TopLabelMap] = None, member_maps: Sequence[TopLabelMap] = (),
                     checkpoint: Optional[str] = None) -> str:
    """Write ``folder/temperature.json`` ({"temperature", "fitted_on"[, "top_label_map"][, "member_maps"]})
    atomically; returns its path. ``checkpoint`` (when known): the checkpoint file whose weights the fit was made
    on, written as ``fitted_on["checkpoint"]`` (:func:`load_calibration` applies it only to those weights)."""
    FoldCalibration(float(temperature), top_label_map, tuple(member_maps))  # refuses what it could not load
    path = os.path.join(folder, TEMPERATURE_FILE)
    if checkpoint is not None:
        fitted_on = {**fitted_on, "checkpoint": checkpoint}
    content: dict = {"temperature": float(temperature), "fitted_on": fitted_on}
    if top_label_map is not None:
        content["top_label_map"] = top_label_map.to_dict()
    if member_maps:
        content["member_maps"] = [m.to_dict() for m in member_maps]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)
    return path


def fitted_on(content: Optional[dict]) -> dict:
    """What a temperature file's fit was made on (its ``fitted_on`` block: ``sampler`` settings, the cases, and
    ``pooled_folds`` for a pooled fit of ``mfs_pool_calibration``); ``{}`` for no file or a file without one."""
    return (content or {}).get("fitted_on") or {}


def load_calibration(folder: str, sampler: Optional[dict] = None,
                     checkpoint: Optional[str] = None) -> Optional[FoldCalibration]:
    """The calibration saved in ``folder``; ``None`` when there is none, when it was fitted for other ``sampler``
    settings than these (a T fitted for one sample at one step over-softens K averaged samples) or on the weights
    of another ``checkpoint`` file than this one (e.g. fitted after ``--val_best`` on ``checkpoint_best.pth``, now
    predicting with ``checkpoint_final.pth``; files that name none are taken). A broken file is a UserError."""
    path = os.path.join(folder, TEMPERATURE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        content = json.load(open(path))
        value = float(content["temperature"])
        mapped = TopLabelMap.from_dict(content["top_label_map"]) if content.get("top_label_map") else None
        members = tuple(TopLabelMap.from_dict(m) for m in content.get("member_maps") or ())
        calibration = FoldCalibration(value, mapped, members)
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{path} is not a temperature file ({e}); delete it or refit it") from e
    if not T_BOUNDS[0] <= value <= T_BOUNDS[1]:
        raise UserError(f"{path}: temperature {value} outside {T_BOUNDS}")
    fit = fitted_on(content)
    fitted_for = fit.get("sampler")
    if sampler is not None and fitted_for is not None and fitted_for != sampler:
        logger.info("%s was fitted for %s, not %s: probabilities are not temperature-scaled", path, fitted_for,
                    sampler)
        return None
    fitted_with = fit.get("checkpoint")
    if checkpoint is not None and fitted_with is not None and fitted_with != checkpoint:
        logger.warning("%s was fitted on the weights of %s, not %s: probabilities are not calibrated (rerun the "
                       "fold's validation with these weights to fit them)", path, fitted_with, checkpoint)
        return None
    pooled = fit.get("pooled_folds")
    logger.info("%s: T %.3f%s, fitted on %s", path, value, " + top-label map" if mapped else
                f" + {len(members)} member maps" if members else "",
                f"the pooled validations of {len(pooled)} folds (mfs_pool_calibration)" if pooled
                else "this fold's validation")
    return calibration

