"""Segmentation evaluation: Dice, HD95, normalised surface Dice (NSD) and volume difference.

Conventions
-----------
* Arrays are in numpy order (``z, y, x`` for 3D; any dimensionality works, e.g. 2D) and ``spacing`` is given in that
  same axis order, in mm. SimpleITK reports spacing as ``(x, y, z)``; :func:`evaluate_case` reverses it.
* Surface voxels of a mask are ``mask & ~binary_erosion(mask)`` (face connectivity; mask voxels on the image border
  are surface voxels). Surface distances use ``distance_transform_edt(~surface, sampling=spacing)``: for every surface
  voxel of one mask, the distance (mm) to the nearest surface voxel of the other mask (MedPy/DeepMind convention).
  The computation is cropped to the bounding box of both masks (plus one voxel), which leaves the result unchanged.
* HD95 is the 95th percentile (linear interpolation) of the *union* of both directed distance sets (ref->pred and
  pred->ref). This is symmetric; it is *not* MedPy's ``max`` of the two directed 95th percentiles.
* NSD (Nikolov et al., 2021) is ``(#ref surface voxels within tolerance of the pred surface + #pred surface voxels
  within tolerance of the ref surface) / (#ref surface voxels + #pred surface voxels)``: the voxel-count approximation
  of the surfel-area-weighted definition.
* Empty masks:

  ==================  ====  =====  ===  ==========================
  case                Dice  HD95   NSD  VolumeDiff
  ==================  ====  =====  ===  ==========================
  both empty          1.0   0.0    1.0  0.0
  exactly one empty   0.0   inf    0.0  pred - ref volume (finite)
  ==================  ====  =====  ===  ==========================

  (:func:`surface_distances` returns ``inf`` for every surface voxel whose counterpart surface is empty.)
* Aggregation (:func:`evaluate_folder`): ``mean`` and ``median`` per label ignore non-finite values (i.e. the ``inf``
  HD95 of cases where exactly one mask is empty); the number of ignored cases is reported as ``HD95_n_inf``. If all
  values are non-finite the aggregate is NaN. ``foreground_mean`` averages the per-label means over all labels except
  label ``0`` (again ignoring non-finite values); its ``HD95_n_inf`` is the sum over those labels.
* JSON: labels/regions are keys as strings (``"1"``, regions ``"(1, 2)"``, like nnU-Net) and every non-finite float
  (``inf``/``NaN``) is stored as ``null``. In ``metric_per_case`` a ``null`` HD95 therefore means ``inf``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from typing import Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, distance_transform_edt
from tqdm import tqdm

logger = logging.getLogger(__name__)

LabelOrRegion = Union[int, tuple[int, ...]]
METRICS = ("Dice", "HD95", "NSD", "VolumeDiff", "n_ref", "n_pred")

__all__ = ["dice", "surface_distances", "hd95", "normalized_surface_dice", "volume_difference", "label_key",
           "evaluate_case", "evaluate_folder", "METRICS"]


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient ``2|A & B| / (|A| + |B|)`` of two boolean masks (1.0 if both are empty)."""
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    denom = int(ref.sum()) + int(pred.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(ref, pred).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels ``mask & ~binary_erosion(mask)`` (border voxels of the array count as surface)."""
    return mask & ~binary_erosion(mask, border_value=0)


def surface_distances(ref: np.ndarray, pred: np.ndarray,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm.

    Returns ``(d_ref_to_pred, d_pred_to_ref)``: for each surface voxel of ``ref`` the distance to the nearest surface
    voxel of ``pred`` and vice versa. A surface voxel whose counterpart mask is empty gets ``inf``; an empty mask
    contributes an empty array. ``spacing`` is in array axis order (default: 1 mm isotropic).
    """
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: ref {ref.shape} vs pred {pred.shape}")
    spacing = np.ones(ref.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if spacing.shape != (ref.ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match mask dimensionality {ref.ndim}")
    union = ref | pred
    if not union.any():
        return np.zeros(0), np.zeros(0)
    # crop to the bounding box of both masks, padded by one background voxel: all surface voxels lie inside, so the
    # distances are unchanged, and the padding reproduces border_value=0 erosion at the original array border
    coords = np.nonzero(union)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    ref_c, pred_c = np.pad(ref[box], 1), np.pad(pred[box], 1)
    ref_s, pred_s = _surface(ref_c), _surface(pred_c)
    if not pred_s.any():
        return np.full(int(ref_s.sum()), np.inf), np.zeros(0)
    if not ref_s.any():
        return np.zeros(0), np.full(int(pred_s.sum()), np.inf)
    d_to_pred = distance_transform_edt(~pred_s, sampling=spacing)
    d_to_ref = distance_transform_edt(~ref_s, sampling=spacing)
    return d_to_pred[ref_s], d_to_ref[pred_s]


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance (mm) over the union of both directed surface-distance sets.

    Both masks empty -> 0.0; exactly one empty -> ``inf``.
    """
    return _hd95_from(np.concatenate(surface_distances(ref, pred, spacing)))


def _hd95_from(d: np.ndarray) -> float:
    """HD95 from the pooled directed distances (0.0 if empty, ``inf`` if any is infinite)."""
    if d.size == 0:
        return 0.0
    if np.isinf(d).any():
        return float("inf")
    return float(np.percentile(d, 95))


def normalized_surface_dice(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None,
                            tolerance_mm: float = 1.0) -> float:
    """Normalised surface Dice: fraction of surface voxels of both masks within ``tolerance_mm`` of the other surface.

    Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    return _nsd_from(np.concatenate(surface_distances(ref, pred, spacing)), tolerance_mm)


def _nsd_from(d: np.ndarray, tolerance_mm: float) -> float:
    """NSD from the pooled directed distances (1.0 if empty)."""
    return 1.0 if d.size == 0 else float(np.count_nonzero(d <= tolerance_mm) / d.size)


def volume_difference(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float] | None = None,
                      relative: bool = False) -> float:
    """Predicted minus reference volume in mm^3.

    With ``relative=True`` returns ``(V_pred - V_ref) / V_ref`` instead (0.0 if both are empty, ``inf`` if only the
    reference is empty).
    """
    ref, pred = np.asarray(ref, dtype=bool), np.asarray(pred, dtype=bool)
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    v_ref, v_pred = int(ref.sum()) * voxel, int(pred.sum()) * voxel
    if not relative:
        return v_pred - v_ref
    if v_ref == 0:
        return 0.0 if v_pred == 0 else float("inf")
    return (v_pred - v_ref) / v_ref


def label_key(label: LabelOrRegion) -> str:
    """String key of a label (``"1"``) or region (``"(1, 2)"``), as used by nnU-Net's summary.json."""
    return str(int(label)) if np.isscalar(label) else str(tuple(int(i) for i in label))


def _mask(seg: np.ndarray, label: LabelOrRegion) -> np.ndarray:
    """Boolean mask of a label, or of the union of the labels of a region (tuple)."""
    return seg == label if np.isscalar(label) else np.isin(seg, np.asarray(label))


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a segmentation with SimpleITK; returns the array and the spacing in array (z, y, x) order."""
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), np.asarray(img.GetSpacing(), dtype=float)[::-1]


def evaluate_case(ref_file: str, pred_file: str, labels: Sequence[LabelOrRegion], tolerance_mm: float = 1.0) -> dict:
    """Evaluate one prediction against its reference for every label (int) or region (tuple of ints = union).

    Returns ``{"reference_file", "prediction_file", "metrics": {label_key: {Dice, HD95, NSD, VolumeDiff, n_ref,
    n_pred}}}`` with raw floats (HD95 may be ``inf``). Spacing is taken from the reference image.
    """
    ref, spacing = _read(ref_file)
    pred, pred_spacing = _read(pred_file)
    if ref.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {ref_file} has shape {ref.shape} but prediction {pred_file} "
                         f"has shape {pred.shape}")
    if not np.allclose(spacing, pred_spacing, rtol=1e-3, atol=1e-5):
        logger.warning("spacing mismatch between %s %s and %s %s; using the reference spacing", ref_file,
                       tuple(spacing), pred_file, tuple(pred_spacing))
    metrics = {}
    for label in labels:
        m_ref, m_pred = _mask(ref, label), _mask(pred, label)
        d = np.concatenate(surface_distances(m_ref, m_pred, spacing))
        metrics[label_key(label)] = {
            "Dice": dice(m_ref, m_pred),
            "HD95": _hd95_from(d),
            "NSD": _nsd_from(d, tolerance_mm),
            "VolumeDiff": volume_difference(m_ref, m_pred, spacing),
            "n_ref": int(m_ref.sum()),
            "n_pred": int(m_pred.sum()),
        }
    return {"reference_file": ref_file, "prediction_file": pred_file, "metrics": metrics}


def _evaluate_case_star(args: tuple) -> dict:
    """Picklable ``evaluate_case(*args)`` for multiprocessing."""
    return evaluate_case(*args)


def _finite_stat(values: list[float], fn) -> float:
    """``fn`` over the finite values (NaN if there are none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(fn(finite)) if finite else float("nan")


def _json_safe(obj):
    """Recursively convert numpy scalars to Python types and non-finite floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _list_files(folder: str, file_ending: str) -> list[str]:
    """Sorted names of the regular files in ``folder`` ending with ``file_ending``."""
    return sorted(f for f in os.listdir(folder) if f.endswith(file_ending) and os.path.isfile(os.path.join(folder, f)))


def _name_list(names: list[str], limit: int = 10) -> str:
    """Comma-separated names, truncated after ``limit``."""
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def evaluate_folder(ref_dir: str, pred_dir: str, labels: Sequence[LabelOrRegion] | None = None,
                    tolerance_mm: float = 1.0, file_ending: str = ".nii.gz", num_processes: int = 1,
                    output_file: str | None = None) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    ``labels`` defaults to all nonzero labels found in the references; tuples are regions. Raises
    ``FileNotFoundError`` for a missing folder and ``ValueError`` if there are no prediction files, if a prediction
    has no reference or a reference has no prediction. Returns a JSON-serialisable dict ``{"metric_per_case",
    "mean", "median", "foreground_mean"}`` (see the module docstring) and writes it to ``output_file`` if given.
    """
    for folder in (ref_dir, pred_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder does not exist: {folder}")
    pred_names, ref_names = _list_files(pred_dir, file_ending), _list_files(ref_dir, file_ending)
    if not pred_names:
        raise ValueError(f"no '*{file_ending}' files found in prediction folder {pred_dir}")
    no_ref = sorted(set(pred_names) - set(ref_names))
    if no_ref:
        raise ValueError(f"{len(no_ref)} prediction(s) in {pred_dir} have no reference in {ref_dir}: "
                         f"{_name_list(no_ref)}")
    no_pred = sorted(set(ref_names) - set(pred_names))
    if no_pred:
        raise ValueError(f"{len(no_pred)} reference(s) in {ref_dir} have no prediction in {pred_dir}: "
                         f"{_name_list(no_pred)}")
    if labels is None:
        found: set[int] = set()
        for name in ref_names:
            found.update(int(v) for v in np.unique(_read(os.path.join(ref_dir, name))[0]))
        labels = sorted(found - {0})
        logger.info("evaluating labels found in the references: %s", labels)
    labels = [int(x) if np.isscalar(x) else tuple(int(i) for i in x) for x in labels]
    if not labels:
        raise ValueError(f"no labels to evaluate (no foreground labels found in {ref_dir}); pass labels explicitly")

    jobs = [(os.path.join(ref_dir, n), os.path.join(pred_dir, n), labels, tolerance_mm) for n in pred_names]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            cases = list(tqdm(pool.imap(_evaluate_case_star, jobs), total=len(jobs), desc="Evaluating"))
    else:
        cases = [evaluate_case(*job) for job in tqdm(jobs, desc="Evaluating")]

    keys = [label_key(x) for x in labels]
    summary: dict = {"mean": {}, "median": {}}
    for key in keys:
        for agg, fn in (("mean", np.mean), ("median", np.median)):
            summary[agg][key] = {m: _finite_stat([c["metrics"][key][m] for c in cases], fn) for m in METRICS}
            summary[agg][key]["HD95_n_inf"] = sum(not np.isfinite(c["metrics"][key]["HD95"]) for c in cases)
    fg = [k for k in keys if k != "0"]
    fg_mean = {m: _finite_stat([summary["mean"][k][m] for k in fg], np.mean) for m in METRICS}
    fg_mean["HD95_n_inf"] = sum(summary["mean"][k]["HD95_n_inf"] for k in fg)
    result = _json_safe({"metric_per_case": cases, "mean": summary["mean"], "median": summary["median"],
                         "foreground_mean": fg_mean})
    if output_file is not None:
        out_dir = os.path.dirname(os.path.abspath(output_file))
        os.makedirs(out_dir, exist_ok=True)
        with open(output_file, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True, allow_nan=False)
        logger.info("wrote %s", output_file)
    return result
