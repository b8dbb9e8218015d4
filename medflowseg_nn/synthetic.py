"""A small synthetic segmentation dataset in nnU-Net v2 raw format (no external data needed).

Each case is an image with two nested structures: an ellipsoid (label 1) with an off-centre core (label 2),
different intensities per label, a smooth bias field and Gaussian noise. 3D cases are NIfTI volumes; 2D cases
are single-slice NIfTI images, which nnU-Net plans as a 2d-only dataset.

Options for nnU-Net's label features: ``regions=True`` declares the two nested structures as overlapping
regions (``whole`` = labels 1 and 2, ``core`` = label 2, ``regions_class_order`` [1, 2]); ``ignore_fraction``
> 0 adds an ``ignore`` label (3) and sets that fraction of each training label map's voxels to it (test labels
stay complete).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)


def synthetic_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of ``shape`` (2D or 3D)."""
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array([s / 2 for s in shape]) + rng.uniform(-0.12, 0.12, len(shape)) * np.array(shape)
    radii = rng.uniform(0.22, 0.34, len(shape)) * np.array(shape)
    r = np.sqrt(sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii)))
    core_centre = centre + rng.uniform(-0.25, 0.25, len(shape)) * radii
    r_core = np.sqrt(sum(((g - c) / (0.45 * rad)) ** 2 for g, c, rad in zip(grid, core_centre, radii)))
    label = np.zeros(shape, np.uint8)
    label[r <= 1] = 1
    label[(r_core <= 1) & (r <= 1)] = 2
    intensities = np.array([0.0, 1.0, 2.2]) + rng.normal(0, 0.1, 3)
    image = intensities[label].astype(np.float32)
    bias = gaussian_filter(rng.normal(0, 1, shape), sigma=max(shape) / 4)
    image += 0.6 * bias / (np.abs(bias).max() + 1e-8) + rng.normal(0, 0.35, shape)
    image = gaussian_filter(image, 0.6) * 100 + 300
    return image.astype(np.float32), label


def _write(array: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing][::-1])
    sitk.WriteImage(img, str(path), useCompression=True)


IGNORE_LABEL = 3  #: the ``ignore`` label of ``make_synthetic_dataset(ignore_fraction > 0)``


def erase_labels(label: np.ndarray, fraction: float, rng: np.random.Generator,
                 ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """A copy of ``label`` with a random ``fraction`` of its voxels set to ``ignore_label``."""
    erased = label.copy()
    erased[rng.random(label.shape) < fraction] = ignore_label
    return erased


def dataset_labels(regions: bool, ignore: bool) -> dict:
    """dataset.json ``labels`` (and ``regions_class_order``) of the synthetic dataset."""
    labels: dict = {"background": 0, "whole": [1, 2], "core": 2} if regions else \
        {"background": 0, "outer": 1, "core": 2}
    if ignore:
        labels["ignore"] = IGNORE_LABEL
    return {"labels": labels, **({"regions_class_order": [1, 2]} if regions else {})}


def make_synthetic_dataset(raw_root: str | Path, dataset_id: int = 990, name: str = "Synthetic",
                           num_train: int = 12, num_test: int = 0, shape: Sequence[int] = (32, 40, 36),
                           spacing: Sequence[float] | None = None, seed: int = 0, regions: bool = False,
                           ignore_fraction: float = 0.0) -> Path:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_root`` (imagesTr/labelsTr, and imagesTs/labelsTs when
    ``num_test`` > 0) and return its folder. ``shape`` of length 2 makes a 2D dataset; ``regions`` and
    ``ignore_fraction`` see the module docstring."""
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape}")
    if not 0.0 <= ignore_fraction < 1.0:
        raise ValueError(f"ignore_fraction must be in [0, 1), got {ignore_fraction}")
    spacing = spacing or [1.0] * len(shape)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    rng = np.random.default_rng(seed)
    for split, n in (("Tr", num_train), ("Ts", num_test)):
        if n == 0:
            continue
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = synthetic_case(shape, rng)
            if split == "Tr" and ignore_fraction > 0:
                label = erase_labels(label, ignore_fraction, rng)
            case = f"{name.lower()}_{split.lower()}{i:03d}"
            _write(image, spacing, folder / f"images{split}" / f"{case}_0000.nii.gz")
            _write(label, spacing, folder / f"labels{split}" / f"{case}.nii.gz")
    dataset_json = {"channel_names": {"0": "MRI"}, **dataset_labels(regions, ignore_fraction > 0),
                    "numTraining": num_train, "file_ending": ".nii.gz", "name": name,
                    "description": "synthetic nested ellipsoids generated by medflowseg_nn.synthetic"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    logger.info("wrote %d training and %d test cases to %s", num_train, num_test, folder)
    return folder
