"""Calibration of a folder of nnU-Net probability files (``CASE.npz``) against reference segmentations.

What ``mfs_evaluate --probabilities DIR`` runs. ``DIR/CASE.npz`` holds ``probabilities`` [C, *S] (summing to 1 over
C), written by ``mfs_predict --save_probabilities`` and by nnU-Net's predictor. Their spatial axes are in the array
layout of nnU-Net's SimpleITK reader, ``sitk.GetArrayFromImage`` (z, y, x for 3D), which is also how
:mod:`medflowseg_nn.evaluation` reads the reference and the segmentation, so probabilities and reference align
voxel by voxel; a transposed array is rejected by the shape check (unless the image is a cube).

Per case and pooled over all cases (exact, see :mod:`medflowseg_nn.calibration`): ECE, Brier, NLL, AURC, over all
voxels and over the ROI = reference foreground dilated by ``roi_dilation`` voxels (cube). Case level: Spearman
between each case's mean predictive entropy (over the ROI, and over the image) and 1 - its mean foreground Dice,
and between its expected Dice error (``calibration.expected_dice_error``, reference-free) and 1 - that Dice.
The Dice comes from ``case_dice`` (the CLI passes the Dice of the segmentation files in ``-pred`` computed by
:func:`medflowseg_nn.evaluation.evaluate_folder`, i.e. the segmentation that is actually evaluated); without it,
from the argmax of the probabilities (mean over labels 1 .. C-1, ``evaluation.dice``).

Imports no nnunetv2.
"""
from __future__ import annotations

import os
import zipfile
from typing import Optional

import numpy as np
import SimpleITK as sitk

from medflowseg_nn.calibration import (N_BINS, CalibrationAccumulator, expected_dice_error, predictive_entropy,
                                       reference_roi, spearman)
from medflowseg_nn.errors import UserError

__all__ = ["read_reference", "read_probabilities", "case_rows", "roi_rows", "argmax_foreground_dice", "folder_rows",
           "case_foreground_dice", "evaluate_probability_folder", "format_calibration_table"]
SUM_TOLERANCE = 1e-2  # float16 files or rounding; logits would be far off
PER_CASE_KEYS = ("n_voxels", "accuracy", "ece", "brier", "nll", "aurc", "mean_entropy")


def read_reference(path: str) -> np.ndarray:
    """Reference labels [*S] as :mod:`medflowseg_nn.evaluation` reads them (``sitk.GetArrayFromImage``)."""
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as e:
        raise UserError(f"cannot read reference {path}: {str(e).strip().splitlines()[-1]}") from None


def read_probabilities(path: str) -> np.ndarray:
    """``probabilities`` [C, *S] from a ``CASE.npz``; :class:`UserError` if unreadable or not probabilities."""
    try:
        with np.load(path) as npz:
            if "probabilities" not in npz.files:
                raise UserError(f"{path} has no 'probabilities' array (found: {', '.join(npz.files) or 'none'}); "
                                "expected nnU-Net's CASE.npz from mfs_predict --save_probabilities")
            probs = np.asarray(npz["probabilities"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); rewrite it with --save_probabilities") \
            from None
    if probs.ndim < 2 or not np.issubdtype(probs.dtype, np.floating):
        raise UserError(f"{path}: 'probabilities' must be a float array [C, *S], got {probs.dtype} {probs.shape}")
    dev = float(np.max(np.abs(probs.sum(0, dtype=np.float64) - 1.0))) if probs.size else 0.0
    if not np.isfinite(dev) or dev > SUM_TOLERANCE:
        raise UserError(f"{path}: probabilities do not sum to 1 over the class axis 0 (max deviation {dev:.3g}); "
                        "save softmax probabilities [C, *S], not logits")
    return probs


def case_rows(prob_file: str, ref_file: str, roi_dilation: int = 3,
              ignore_label: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """One case's ROI voxels as rows, what a calibration is fitted on: probabilities ``[N, C]`` (the file's dtype)
    and labels ``[N]`` int64. ROI = the reference's foreground dilated by ``roi_dilation`` voxels (cube), less the
    voxels with ``ignore_label`` (which count as background for the dilation)."""
    p = read_probabilities(prob_file)
    ref = read_reference(ref_file)
    if p.shape[1:] != ref.shape and [n for n in p.shape[1:] if n != 1] == [n for n in ref.shape if n != 1]:
        p = p.reshape(p.shape[0], *ref.shape)  # 2d: nnU-Net writes [C, 1, H, W] for an [H, W] reference
    if p.shape[1:] != ref.shape:
        raise UserError(f"{prob_file}: probabilities {p.shape} do not match the reference {ref_file} {ref.shape}")
    return roi_rows(p, ref, roi_dilation, ignore_label)


def roi_rows(probabilities: np.ndarray, reference: np.ndarray, roi_dilation: int = 3,
             ignore_label: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``probabilities [C, *S]`` and ``reference [*S]`` -> the ROI voxels as rows ``[N, C]`` and labels ``[N]``
    int64: the reference's foreground dilated by ``roi_dilation`` voxels (cube), less the voxels with
    ``ignore_label`` or a negative label (nnU-Net's preprocessed segmentations mark outside-the-mask voxels -1),
    which count as background for the dilation."""
    keep = reference >= 0 if ignore_label is None else (reference >= 0) & (reference != ignore_label)
    ref = np.where(keep, reference, 0)
    roi = reference_roi(ref, roi_dilation) & keep
    return np.moveaxis(probabilities, 0, -1)[roi], ref[roi].astype(np.int64)


def folder_rows(prob_dir: str, ref_dir: str, file_ending: str = ".nii.gz", roi_dilation: int = 3,
                ignore_label: Optional[int] = None,
                max_cases: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`case_rows` of every ``prob_dir/CASE.npz`` (sorted, the first ``max_cases``) against
    ``ref_dir/CASE{file_ending}``, concatenated in case order: rows ``[N, C]``, labels ``[N]``, the cases. One case
    is in memory at a time apart from its rows."""
    if not os.path.isdir(prob_dir):
        raise UserError(f"{prob_dir} is not a folder of CASE.npz probabilities")
    cases = sorted(f[:-4] for f in os.listdir(prob_dir) if f.endswith(".npz"))[:max_cases]
    if not cases:
        raise UserError(f"no CASE.npz probabilities in {prob_dir} to fit a temperature on")
    got = [case_rows(os.path.join(prob_dir, c + ".npz"), os.path.join(ref_dir, c + file_ending), roi_dilation,
                     ignore_label) for c in cases]
    if len({r.shape[1] for r, _ in got}) != 1:
        raise UserError(f"{prob_dir}: the cases do not all have the same number of classes")
    return np.concatenate([r for r, _ in got]), np.concatenate([y for _, y in got]), cases


def case_foreground_dice(evaluation_result: dict, file_ending: str = ".nii.gz") -> dict[str, float]:
    """``{case: mean Dice over the labels except "0"}`` from an :func:`evaluate_folder` result."""
    out = {}
    for c in evaluation_result["metric_per_case"]:
        name = os.path.basename(c["prediction_file"])
        values = [m["Dice"] for k, m in c["metrics"].items() if k != "0" and m["Dice"] is not None]
        out[name[: -len(file_ending)] if name.endswith(file_ending) else name] = \
            float(np.mean(values)) if values else float("nan")
    return out


def argmax_foreground_dice(probs: np.ndarray, ref: np.ndarray) -> float:
    """Mean over the foreground classes of the Dice of ``probs [C, *S]``'s argmax against ``ref [*S]``
    (``evaluation.dice``: 1 where both are empty)."""
    from medflowseg_nn.evaluation import dice
    seg = probs.argmax(0)
    return float(np.mean([dice(ref == c, seg == c) for c in range(1, probs.shape[0])]))


def evaluate_probability_folder(ref_dir: str, prob_dir: str, case_dice: Optional[dict[str, float]] = None,
                                roi_dilation: int = 3, file_ending: str = ".nii.gz",
                                n_bins: int = N_BINS) -> dict:
    """Calibration of every ``prob_dir/CASE.npz`` against ``ref_dir/CASE{file_ending}``; JSON-ready dict
    ``{"settings", "n_cases", "dataset": {"all", "roi"}, "spearman": {"roi", "all", "expected_dice_error"},
    "per_case"}``.

    ``case_dice`` (``{case: mean foreground Dice}``) must cover exactly the cases of ``prob_dir``; ``None`` = Dice of
    the argmax. Raises :class:`UserError` for a missing folder, no/unmatched files, a file without
    ``probabilities``, a shape mismatch with the reference or labels outside the probability classes.
    """
    for folder, what in ((prob_dir, "probabilities"), (ref_dir, "reference")):
        if not os.path.isdir(folder):
            raise UserError(f"{what} folder does not exist: {folder}")
    cases = sorted(f[:-4] for f in os.listdir(prob_dir) if f.endswith(".npz"))
    if not cases:
        raise UserError(f"no CASE.npz files in {prob_dir}; predict with mfs_predict --save_probabilities")
    missing = [c for c in cases if not os.path.isfile(os.path.join(ref_dir, c + file_ending))]
    if missing:
        raise UserError(f"{len(missing)} probability file(s) in {prob_dir} have no reference {missing[0]}{file_ending}"
                        f" in {ref_dir} (first of: {', '.join(missing[:5])})")
    if case_dice is not None and set(case_dice) != set(cases):
        diff = sorted(set(case_dice) ^ set(cases))
        raise UserError(f"the cases in {prob_dir} (*.npz) and in the prediction folder differ: {', '.join(diff[:5])}"
                        " — save probabilities for exactly the evaluated segmentations")
    pooled = {"all": CalibrationAccumulator(n_bins), "roi": CalibrationAccumulator(n_bins)}
    per_case: dict[str, dict] = {}
    for case in cases:
        npz, ref_file = os.path.join(prob_dir, case + ".npz"), os.path.join(ref_dir, case + file_ending)
        probs, ref = read_probabilities(npz), read_reference(ref_file)
        if probs.shape[1:] != ref.shape:
            raise UserError(f"{npz}: probabilities have spatial shape {probs.shape[1:]} but the reference {ref_file} "
                            f"has shape {ref.shape}; expected [C, *S] in the reference's array layout (same case?)")
        if ref.size and (ref.min() < 0 or ref.max() >= probs.shape[0]):
            raise UserError(f"{ref_file} has label {int(ref.max())} but {npz} has only {probs.shape[0]} classes")
        roi = reference_roi(ref, roi_dilation)
        entropy = predictive_entropy(probs)
        row: dict = {"dice_fg": case_dice[case] if case_dice is not None else argmax_foreground_dice(probs, ref),
                     "mean_entropy_all": float(entropy.mean()),
                     "mean_entropy_roi": float(entropy[roi].mean()) if roi.any() else float("nan"),
                     "expected_dice_error": expected_dice_error(probs, range(1, probs.shape[0]))}
        for region, mask in (("all", None), ("roi", roi)):
            one = CalibrationAccumulator(n_bins)
            one.update(probs, ref, mask)
            res = one.result().to_dict()
            row[region] = {k: res[k] for k in PER_CASE_KEYS}
            pooled[region].merge(one)
        per_case[case] = row
    err = [1.0 - per_case[c]["dice_fg"] for c in cases]
    rho = {r: spearman([per_case[c][f"mean_entropy_{r}"] for c in cases], err).to_dict() for r in ("roi", "all")}
    rho["expected_dice_error"] = spearman([per_case[c]["expected_dice_error"] for c in cases], err).to_dict()
    settings = {"n_bins": n_bins, "roi_dilation": roi_dilation, "roi_structure": "cube (Chebyshev ball)",
                "dice_source": "segmentation files" if case_dice is not None else "argmax of probabilities",
                "probabilities": os.path.abspath(prob_dir)}
    for row in per_case.values():
        row["mean_entropy_roi"] = row["mean_entropy_roi"] if np.isfinite(row["mean_entropy_roi"]) else None
    return {"settings": settings, "n_cases": len(cases),
            "dataset": {r: a.result().to_dict() for r, a in pooled.items()}, "spearman": rho, "per_case": per_case}


def format_calibration_table(result: dict) -> str:
    """Compact table of the pooled metrics (all voxels / ROI) plus the case-level Spearman line."""
    def f(v, d: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"
    rows = [("region", "voxels", "acc", "ECE", "Brier", "NLL", "AURC", "AURC opt")]
    for region in ("all", "roi"):
        m = result["dataset"][region]
        rows.append((region, str(m["n_voxels"]), f(m["accuracy"]), f(m["ece"]), f(m["brier"]), f(m["nll"]),
                     f(m["aurc"]), f(m["aurc_optimal"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    s = result["spearman"]
    lines.append(f"Spearman(mean entropy, 1 - fg Dice) over {s['roi']['n']} case(s): roi rho {f(s['roi']['rho'], 3)} "
                 f"(p {f(s['roi']['p_value'], 3)}), all rho {f(s['all']['rho'], 3)} (p {f(s['all']['p_value'], 3)})")
    if "expected_dice_error" in s:
        e = s["expected_dice_error"]
        lines.append(f"Spearman(expected Dice error, 1 - fg Dice), reference-free: rho {f(e['rho'], 3)} "
                     f"(p {f(e['p_value'], 3)})")
    return "\n".join(lines)

