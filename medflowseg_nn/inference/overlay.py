"""Quick-look PNGs of a prediction: image middle slices with the predicted labels overlaid (matplotlib, Agg).

``mfs_predict --overlay_png DIR`` writes ``DIR/CASE.png``: for a 3D image the three orthogonal middle slices
(of the array axes 0, 1, 2, displayed with the voxel spacing as aspect ratio), for a 2D image the image itself;
the top row is the grey-value image (first channel, 1st–99th percentile window) with the labels in colour
(tab10; label 0 transparent; legend with the dataset.json label names), and — when uncertainty maps were
computed — a second row shows the predictive entropy (nats) of the same slices.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def middle_slices(volume: np.ndarray, spacing: Optional[Sequence[float]] = None) -> list[tuple[str, np.ndarray, float]]:
    """``volume [*S]`` (2D, or 3D where a size-1 axis makes it 2D) → ``[(title, slice [H, W], aspect)]``.

    ``aspect`` is the displayed height/width of a pixel (row spacing / column spacing)."""
    volume = np.asarray(volume)
    spacing = list(spacing) if spacing is not None else [1.0] * volume.ndim
    spacing = spacing[-volume.ndim:] if len(spacing) >= volume.ndim else [1.0] * volume.ndim
    keep = [i for i, s in enumerate(volume.shape) if s > 1]
    if len(keep) <= 2:  # 2D image (possibly stored as [1, H, W])
        image = volume.reshape([volume.shape[i] for i in keep] or [1, 1])
        sp = [spacing[i] for i in keep] if len(keep) == 2 else [1.0, 1.0]
        return [("image", image, sp[0] / sp[1])]
    if volume.ndim != 3:
        raise ValueError(f"expected a 2D or 3D image, got shape {volume.shape}")
    views = []
    for axis in range(3):
        rows, cols = [a for a in range(3) if a != axis]
        index = volume.shape[axis] // 2
        views.append((f"axis {axis} = {index}", np.take(volume, index, axis=axis), spacing[rows] / spacing[cols]))
    return views


def save_overlay_png(path: str, image: np.ndarray, labels: np.ndarray, entropy: Optional[np.ndarray] = None,
                     spacing: Optional[Sequence[float]] = None, label_names: Optional[Mapping[int, str]] = None,
                     title: str = "") -> None:
    """Write the overlay PNG. ``image``, ``labels`` and ``entropy`` are ``[*S]`` arrays in the same layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if np.shape(image) != np.shape(labels):
        raise ValueError(f"image shape {np.shape(image)} != label shape {np.shape(labels)}")
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    views = middle_slices(image, spacing)
    label_views = middle_slices(labels, spacing)
    rows = [("image + labels", views, label_views)]
    if entropy is not None:
        rows.append(("entropy (nats)", middle_slices(entropy, spacing), None))
    colors = ListedColormap(np.array([(0, 0, 0, 0)] + [(*c[:3], 1.0) for c in _tab10()]))
    fig = Figure(figsize=(3.2 * len(views) + 0.8, 3.2 * len(rows) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(views), squeeze=False)
    for r, (row_title, row_views, overlay_views) in enumerate(rows):
        for c, (view_title, sl, aspect) in enumerate(row_views):
            ax = axes[r][c]
            if overlay_views is not None:
                ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                          interpolation="nearest")
                lab = overlay_views[c][1].astype(np.int64)
                ax.imshow(np.where(lab > 0, (lab - 1) % 10 + 1, 0), cmap=colors, vmin=0, vmax=10, alpha=0.45,
                          aspect=aspect, interpolation="nearest")
            else:
                im = ax.imshow(sl, cmap="magma", vmin=0, vmax=max(float(np.max(entropy)), 1e-6), aspect=aspect,
                               interpolation="nearest")
                if c == len(row_views) - 1:
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
            ax.set_title(f"{row_title}: {view_title}" if len(row_views) > 1 else row_title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    if present:
        names = label_names or {}
        handles = [Patch(color=colors((v - 1) % 10 + 1), label=f"{v}: {names.get(v, v)}") for v in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if present else 0, 1, 0.95))
    fig.savefig(path, format="png")
    logger.debug("wrote overlay %s", path)


def _tab10() -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    return [colormaps["tab10"](i) for i in range(10)]
