"""Reliability diagram of a calibration result: what ``mfs_evaluate --probabilities`` draws beside its summary.

One column per voxel set (all voxels, the reference ROI): on top the accuracy of the top label in each confidence
bin against the diagonal (a calibrated predictor lies on it; bars below it are over-confident), the gap shaded,
the ECE in the title; below, the voxels per bin on a log scale (most voxels sit in the last bin). The input is the
``dataset`` block :func:`medflowseg_nn.calibration_folder.evaluate_probability_folder` returns (equal-width bins on
[0, 1], ``None`` for empty bins). matplotlib with the Agg backend, as nnU-Net draws its ``progress.png``.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["save_reliability_diagram"]
REGION_TITLES = {"all": "all voxels", "roi": "reference ROI"}


def save_reliability_diagram(dataset: dict, path: str, title: str = "") -> str:
    """Write the diagram of ``dataset`` (``{"all": metrics, "roi": metrics}``, each with ``bin_count``,
    ``bin_accuracy``, ``bin_confidence``, ``ece``) to ``path`` (PNG); returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = [r for r in ("all", "roi") if r in dataset]
    fig, axes = plt.subplots(2, len(regions), figsize=(4.2 * len(regions), 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for col, region in enumerate(regions):
        m = dataset[region]
        counts = np.asarray(m["bin_count"], dtype=float)
        n_bins = len(counts)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
        acc = np.array([np.nan if a is None else a for a in m["bin_accuracy"]], dtype=float)
        conf = np.array([np.nan if c is None else c for c in m["bin_confidence"]], dtype=float)
        top, bottom = axes[0, col], axes[1, col]
        top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
        filled = counts > 0
        top.bar(centers[filled], acc[filled], width=width * 0.9, color="tab:blue", alpha=0.8, label="accuracy")
        top.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width * 0.9, color="tab:red",
                alpha=0.3, label="gap to confidence")
        ece = m.get("ece")
        top.set_title(f"{REGION_TITLES[region]}: ECE {ece:.4f}" if ece is not None else REGION_TITLES[region])
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy of the top label")
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(centers[filled], counts[filled], width=width * 0.9, color="0.4")
        bottom.set_yscale("log")
        bottom.set_xlabel("confidence (top-label probability)")
        bottom.set_ylabel("voxels")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
