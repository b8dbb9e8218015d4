"""Dataset integrity checks that run before nnU-Net planning (and, per case, before prediction).

:func:`verify_raw_dataset` inspects a dataset in nnU-Net v2 raw format (``dataset.json``, ``imagesTr/``,
``labelsTr/``), collects *every* problem and raises a :class:`DatasetIntegrityError` with one line per problem,
``"<case or file>: <problem> — <fix hint>"``. Tolerances: nnU-Net's ``verify_dataset_integrity`` (``np.allclose``);
unlike nnU-Net, origin and direction mismatches are errors (a misaligned label ruins training)."""
from __future__ import annotations

import json
import logging
import multiprocessing
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medflowseg_nn.errors import UserError, one_line
from medflowseg_nn.nifti_integrity import nifti_payload_complete

logger = logging.getLogger(__name__)

#: File endings read with nnU-Net's ``NaturalImage2DIO`` (skimage.io); they carry no geometry.
NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif")
REQUIRED_KEYS = ("labels", "numTraining", "file_ending")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_GEOMETRY_FIX = "if the voxels are aligned copy the geometry over (sitk: CopyInformation), otherwise resample it"


class DatasetIntegrityError(UserError, ValueError):
    """Raised by :func:`verify_raw_dataset`; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str], dataset_folder: str | Path | None = None) -> None:
        self.problems: list[str] = list(problems)
        where = f" {dataset_folder}" if dataset_folder is not None else ""
        header = f"Dataset{where} failed integrity checks ({len(self.problems)} problem(s)):"
        super().__init__("\n".join([header, *self.problems]))


def _fmt(values: Any) -> str:
    """Format a size/spacing/origin tuple compactly (``(1.0, 1.0, 1.0)``)."""
    return "(" + ", ".join(f"{float(v) + 0.0:.6g}" if isinstance(v, float) else str(v) for v in values) + ")"


def _read(path: str, natural: bool, read_voxels: bool = True) -> tuple[Optional[np.ndarray], dict[str, Any]]:
    """Read one file: (array, info: size, ndim, channels, geometry); raises on read errors. ``read_voxels=False``:
    a NIfTI that :func:`nifti_payload_complete` vouches for is not decoded (array None)."""
    if natural:
        from skimage import io  # what nnU-Net's NaturalImage2DIO uses

        arr = np.asarray(io.imread(path))
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            return arr, {"size": tuple(arr.shape[:2]), "ndim": 2, "channels": int(arr.shape[-1]), "geometry": None}
        return arr, {"size": tuple(arr.shape), "ndim": arr.ndim, "channels": 1, "geometry": None}
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        # SimpleITK's NIfTI reader (2.5.x here) silently reads truncated files and turns NaN into 0, so the voxels
        # are read with nibabel (raises on truncation, keeps NaN); the geometry still comes from SimpleITK, as in
        # nnU-Net's SimpleITKIO.
        import nibabel as nib

        reader.ReadImageInformation()
        complete = not read_voxels and nifti_payload_complete(path)
        arr = None if complete else np.asarray(nib.load(path, mmap=False).dataobj)
    else:
        arr = sitk.GetArrayFromImage(reader.Execute())
    geometry = {"spacing": reader.GetSpacing(), "origin": reader.GetOrigin(), "direction": reader.GetDirection()}
    return arr, {"size": reader.GetSize(), "ndim": reader.GetDimension(), "channels": reader.GetNumberOfComponents(),
                 "geometry": geometry}


def _compare(case: str, what: str, ref_name: str, ref: dict, other: dict, hint: str) -> list[str]:
    """Compare dimensionality, size and (if present) geometry of ``other`` against the reference file."""
    if ref["ndim"] != other["ndim"]:
        return [f"{case}: {what} is {other['ndim']}D (size {_fmt(other['size'])}) but {ref_name} is {ref['ndim']}D "
                f"(size {_fmt(ref['size'])}) — dimension mismatch; re-export both with the same number of axes"]
    if tuple(ref["size"]) != tuple(other["size"]):
        return [f"{case}: {what} has size {_fmt(other['size'])} but {ref_name} has {_fmt(ref['size'])} — {hint}"]
    problems = []
    if ref["geometry"] is not None and other["geometry"] is not None:
        for key in ("spacing", "origin", "direction"):
            a, b = ref["geometry"][key], other["geometry"][key]
            if not np.allclose(a, b):  # nnU-Net's tolerance (np.allclose defaults)
                problems.append(f"{case}: {what} has {key} {_fmt(b)} but {ref_name} has {_fmt(a)} — {key} mismatch; "
                                f"{_GEOMETRY_FIX} onto the {ref_name} grid")
    return problems


def _check_case(task: tuple) -> tuple[list[str], int | None]:
    """:func:`check_case` on a (case, images, label, natural, allowed, n_channels) tuple (what a pool maps)."""
    return check_case(*task)


def check_case(case: str, image_paths: Sequence[str], label_path: Optional[str] = None, natural: bool = False,
               allowed_labels: Optional[list[int]] = None, num_channels: int = 1,
               read_voxels: bool = True) -> tuple[list[str], int | None]:
    """Check one case: every image (and the label, if given) is readable, finite, single-component, on one grid;
    label values are declared. Returns (one line per problem naming the file, number of axes longer than 1 of the
    first image or None). ``read_voxels=False`` (prediction inputs): complete NIfTI images are judged from header
    and size, not decoded, so NaN/Inf in them is not looked for."""
    allowed, n_channels = allowed_labels, num_channels
    problems: list[str] = []
    infos: list[tuple[str, dict]] = []
    for path in image_paths:
        name = Path(path).name
        try:
            arr, info = _read(path, natural, read_voxels)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            problems.append(f"{name}: unreadable image file ({one_line(exc)}) — the file is truncated or corrupt; "
                            "re-export or re-download it")
            continue
        if natural and info["ndim"] != 2:
            problems.append(f"{name}: has shape {_fmt(info['size'])}, not a 2D grayscale/RGB(A) image — natural-image"
                            " formats must be 2D; use .nii.gz/.nrrd/.mha for volumes")
        if not natural and info["channels"] != 1:
            problems.append(f"{name}: has {info['channels']} components per voxel — store each channel in its own"
                            " _XXXX file")
        if arr is not None and np.issubdtype(arr.dtype, np.floating):
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            if n_nan or n_inf:
                problems.append(f"{name}: image contains {n_nan} NaN and {n_inf} Inf voxels — replace non-finite "
                                "values (e.g. np.nan_to_num) before planning")
        if infos:
            problems += _compare(case, f"channel file {name}", infos[0][0], infos[0][1], info,
                                 "all channels of a case must share one voxel grid; resample/register them")
        infos.append((name, info))
    found = sum(i["channels"] for _, i in infos)
    if natural and infos and len(infos) == len(image_paths) and found != n_channels:
        problems.append(f"{case}: image files provide {found} channels (RGB counts 3) but dataset.json declares "
                        f"{n_channels} — channel count mismatch; add the missing channel file(s) or fix channel_names")
    effective = sum(1 for s in infos[0][1]["size"] if s > 1) if infos else None
    if label_path is None:
        return problems, effective
    lname = Path(label_path).name
    try:
        seg, linfo = _read(label_path, natural)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{lname}: unreadable label file ({one_line(exc)}) — the file is truncated or corrupt; "
                        "re-export or re-download it")
        return problems, effective
    if linfo["channels"] != 1:
        problems.append(f"{lname}: label file has {linfo['channels']} channels — labels must be single-channel "
                        "integer maps; convert it to grayscale label values")
    elif allowed is not None:
        values = np.unique(seg)
        bad = [v for v in values.tolist() if not (np.isfinite(v) and float(v).is_integer() and int(v) in allowed)]
        if bad:
            shown = ", ".join(str(int(v)) if np.isfinite(v) and float(v).is_integer() else str(v) for v in bad[:10])
            problems.append(f"{case}: label file {lname} contains label values [{shown}] not declared in dataset.json "
                            f"'labels' (allowed: {sorted(allowed)}) — remap these voxels or declare the values")
    if infos:
        problems += _compare(case, "label file", f"image {infos[0][0]}", infos[0][1], linfo,
                             "resample the label onto the image grid")
    return problems, effective


def _allowed_labels(labels: Any) -> tuple[list[str], list[int] | None]:
    """Validate dataset.json ``labels``; return (problems, allowed ints or None). Regions/ignore contribute too."""
    if not isinstance(labels, dict) or not labels:
        return ["dataset.json: 'labels' must be a non-empty mapping name -> int — e.g. {\"background\": 0}"], None
    problems, allowed = [], set()
    for name, value in labels.items():
        ints = value if isinstance(value, (list, tuple)) else [value]
        if not ints or not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            problems.append(f"dataset.json: label '{name}' has value {value!r}, expected an int (or a list of ints for "
                            "regions) — fix the 'labels' entry")
        allowed.update(v for v in ints if isinstance(v, int))
    if labels.get("background") != 0:
        problems.append("dataset.json: 'labels' must contain \"background\": 0 — add it (nnU-Net reserves 0)")
    ordered = sorted(allowed)
    if ordered and ordered != list(range(ordered[0], ordered[0] + len(ordered))):
        problems.append(f"dataset.json: label values {ordered} are not consecutive — nnU-Net requires 0, 1, 2, ...; "
                        "renumber the labels")
    return problems, (ordered if not problems else None)


def _load_dataset_json(folder: Path) -> tuple[list[str], dict | None]:
    """Load and validate dataset.json; returns (problems, dict or None if it cannot be used at all)."""
    path = folder / "dataset.json"
    if not path.is_file():
        return [f"dataset.json: file not found in {folder} — create it (channel_names, labels, numTraining, "
                "file_ending; see nnU-Net's dataset_format.md)"], None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"dataset.json: not valid JSON ({one_line(exc)}) — fix the syntax"], None
    if not isinstance(data, dict):
        return ["dataset.json: top level must be a JSON object — wrap the keys in {...}"], None
    problems = [f"dataset.json: missing required key '{key}' — add it" for key in REQUIRED_KEYS if key not in data]
    channels = data.get("channel_names", data.get("modality"))
    if not isinstance(channels, dict) or not channels:
        problems.append("dataset.json: missing or empty 'channel_names' (legacy 'modality') — add e.g. {\"0\": \"MR\"}")
    if "numTraining" in data and (not isinstance(data["numTraining"], int) or isinstance(data["numTraining"], bool)):
        problems.append(f"dataset.json: numTraining is {data['numTraining']!r}, not an int — set it to the number "
                        "of labelled cases")
    ending = data.get("file_ending")
    if "file_ending" in data and (not isinstance(ending, str) or not ending.startswith(".")):
        problems.append(f"dataset.json: file_ending {ending!r} must be a string starting with '.' — e.g. \".nii.gz\"")
    usable = isinstance(channels, dict) and bool(channels) and isinstance(ending, str) and ending.startswith(".")
    return problems, (data if usable else None)


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden regular files of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def verify_raw_dataset(dataset_folder: str | Path, num_processes: int = 1) -> None:
    """Check an nnU-Net v2 raw dataset before planning; raise :class:`DatasetIntegrityError` listing all problems.

    Checks dataset.json (exists, valid JSON, required keys, ``"background": 0``, consecutive labels), the
    imagesTr/labelsTr layout (channel files ``_0000`` ... per case, a label per case and vice versa, numTraining),
    and every file's content: readability, NaN/Inf in images, label values declared in ``labels`` (regions and
    ``ignore`` included), per-case channel and image/label agreement of size and, for SimpleITK formats, spacing,
    origin and direction, and dimensionality consistent with the rest of the dataset. Natural-image formats
    (.png/.bmp/.tif, RGB counting as 3 channels) have no geometry, so only their size is compared. Files are
    only read, never written. ``num_processes > 1`` reads cases in a spawn-context process pool.
    """
    start = time.perf_counter()
    folder = Path(dataset_folder)
    problems, data = _load_dataset_json(folder)
    if data is None:
        raise DatasetIntegrityError(problems, folder)
    ending: str = data["file_ending"]
    n_channels = len(data.get("channel_names", data.get("modality")))
    natural = ending.lower() in NATURAL_IMAGE_ENDINGS
    label_problems, allowed = _allowed_labels(data.get("labels"))
    problems += label_problems
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    problems += [f"{d.name}: folder missing in {folder} — put the training {what}{ending}) there"
                 for d, what in ((images_dir, "images (CASE_0000"), (labels_dir, "labels (CASE")) if not d.is_dir()]
    if problems and not (images_dir.is_dir() and labels_dir.is_dir()):
        raise DatasetIntegrityError(problems, folder)

    cases: dict[str, dict[int, Path]] = {}
    image_files = _visible_files(images_dir)
    for f in image_files:
        if not f.name.endswith(ending):
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if m is None:
            problems.append(f"{f.name}: image file name lacks the 4-digit channel suffix — rename it to "
                            f"CASE_0000{ending}")
            continue
        cases.setdefault(m["case"], {})[int(m["channel"])] = f
    others = [f.name for f in image_files if not f.name.endswith(ending)]
    if others:
        logger.warning("imagesTr: ignoring %d file(s) not ending in %s, e.g. %s", len(others), ending, others[0])
        if not cases:
            problems.append(f"imagesTr: no files end in file_ending {ending!r} but found e.g. {others[0]} — fix "
                            "'file_ending' in dataset.json or the file names")
    labels = {f.name[: -len(ending)]: f for f in _visible_files(labels_dir) if f.name.endswith(ending)}
    if "numTraining" in data and data["numTraining"] != len(labels):
        problems.append(f"dataset.json: numTraining is {data['numTraining']} but labelsTr contains {len(labels)} "
                        f"label files — set numTraining to {len(labels)} or add/remove cases")
    for lid in sorted(set(labels) - set(cases)):
        problems.append(f"{labels[lid].name}: label file has no image files ({lid}_0000{ending}, ...) in imagesTr — "
                        "add the images or remove the label")

    tasks = []
    for case, channels in sorted(cases.items()):
        expected = range(n_channels) if not natural else range(max(channels) + 1)
        for c in expected:
            if c not in channels:
                problems.append(f"{case}: missing channel file {case}_{c:04d}{ending} (dataset.json declares "
                                f"{n_channels} channel(s)) — add the file or fix 'channel_names'")
        for c in sorted(set(channels) - set(range(n_channels))):
            problems.append(f"{case}: unexpected channel file {channels[c].name} (dataset.json declares only "
                            f"{n_channels} channel(s), _0000 to _{n_channels - 1:04d}) — remove it or add the "
                            "channel to 'channel_names'")
        if case not in labels:
            problems.append(f"{case}: image file(s) have no label file {case}{ending} in labelsTr — add the label or "
                            "remove the case's images")
        label = str(labels[case]) if case in labels else None
        tasks.append((case, [str(channels[c]) for c in sorted(channels)], label, natural, allowed, n_channels))

    if num_processes > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(tasks))) as pool:
            results = pool.map(_check_case, tasks, chunksize=max(1, len(tasks) // (4 * num_processes)))
    else:
        results = [_check_case(t) for t in tasks]
    problems += [p for case_problems, _ in results for p in case_problems]

    dims = {t[0]: dim for t, (_, dim) in zip(tasks, results) if dim is not None}
    if not natural and dims:
        majority, count = Counter(dims.values()).most_common(1)[0]
        for case, dim in dims.items():
            if dim != majority:
                problems.append(f"{case}: image is effectively {dim}D (axes longer than 1) but {count} of {len(dims)} "
                                f"cases are {majority}D — dimension mismatch: 2D slice or missing/singleton axis; "
                                f"re-export it as a {majority}D volume or remove the case")
    logger.info("verify_raw_dataset(%s): %d case(s), %d problem(s), %.1f s", folder, len(tasks), len(problems),
                time.perf_counter() - start)
    if problems:
        raise DatasetIntegrityError(problems, folder)
