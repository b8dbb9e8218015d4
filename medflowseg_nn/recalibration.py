"""Top-label isotonic recalibration, applied after the temperature (Zadrozny & Elkan 2002, in the top-label form
of Gupta & Ramdas 2022).

A temperature corrects one global over- or under-confidence; what is left is the *shape* of the reliability curve
(e.g. right at 0.99 but wrong too often at 0.8). The map here is a non-decreasing function ``a(c)`` of the top-label
confidence ``c = max_k p_k``, fitted by isotonic regression of "the top label is right" on ``c`` over validation
voxels. Applied to a voxel: the top class gets ``a(c)``, the other classes share ``1 − a(c)`` in the proportions
they had, so the probabilities still sum to 1, and ``a`` is raised where needed so that the top class stays on
top: the segmentation (the argmax) never changes. On the issue-#9 protocol (10 × 100 2d Hippocampus models,
RESULTS 2026-12-06 09:10) this cut the ROI ECE after the temperature by a third to a half for every model, ours and
nnU-Net's alike; AURC does not move (the map keeps the ranking of the voxels).

Library: scikit-learn's ``IsotonicRegression`` (pool adjacent violators; a dependency of nnU-Net) fits the map.
Applying it is linear interpolation between its knots, clipped at the ends — what
``IsotonicRegression.predict(out_of_bounds="clip")`` computes — written in torch here so that the predictor applies
it to its tensors (numpy arrays go through :func:`apply_top_label_map_np`). Imports no nnunetv2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from medflowseg_nn.errors import UserError

__all__ = ["TopLabelMap", "fit_top_label_map", "top_label_map_of_rows", "apply_top_label_map",
           "apply_top_label_map_np", "voxel_rows", "cap_rows", "RowSample"]
_MAX_VOXELS = 2_000_000  # the fits subsample (seeded) beyond this many voxels: the temperature moves < 1e-3
_SHARE_FLOOR = 1e-6  # added to every other class's share: a voxel with c = 1 still spreads 1 − a(c)
_MARGIN = 1e-6  # the top class stays this far above the runner-up


@dataclass(frozen=True)
class TopLabelMap:
    """Knots of a non-decreasing map of the top-label confidence: ``confidence`` strictly increasing in [0, 1],
    ``accuracy`` non-decreasing in [0, 1], the same length (≥ 1). Constant beyond the first and last knot."""

    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]

    def __post_init__(self) -> None:
        c, a = np.asarray(self.confidence, float), np.asarray(self.accuracy, float)
        if c.ndim != 1 or len(c) == 0 or c.shape != a.shape:
            raise UserError(f"a top-label map needs as many confidence as accuracy knots (≥ 1), got {c.shape} "
                            f"and {a.shape}")
        if (np.diff(c) <= 0).any() or (np.diff(a) < 0).any() or c.min() < 0 or c.max() > 1 or a.min() < 0 \
                or a.max() > 1:
            raise UserError("a top-label map's confidence knots must increase and its accuracy knots must not "
                            "decrease, both in [0, 1]")

    def to_dict(self) -> dict[str, list[float]]:
        return {"confidence": list(self.confidence), "accuracy": list(self.accuracy)}

    @classmethod
    def from_dict(cls, d: dict) -> "TopLabelMap":
        return cls(tuple(float(x) for x in d["confidence"]), tuple(float(x) for x in d["accuracy"]))

    def __call__(self, confidence: Tensor) -> Tensor:
        """``a(c)`` elementwise (any shape), float32: linear between the knots, clipped at the ends."""
        xp = torch.tensor(self.confidence, dtype=torch.float32, device=confidence.device)
        fp = torch.tensor(self.accuracy, dtype=torch.float32, device=confidence.device)
        c = confidence.float()
        if len(xp) == 1:
            return fp.expand_as(c).clone()
        hi = torch.searchsorted(xp, c.contiguous()).clamp(1, len(xp) - 1)
        x0, x1, y0, y1 = xp[hi - 1], xp[hi], fp[hi - 1], fp[hi]
        w = ((c - x0) / (x1 - x0)).clamp(0, 1)
        return y0 + w * (y1 - y0)


def voxel_rows(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               masks: Optional[Sequence[np.ndarray]], seed: int, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """The selected voxels of all cases as rows: probabilities ``[N, C]`` and labels ``[N]`` int64, at most 2 million
    (a seeded uniform subsample). Arguments as :func:`fit_top_label_map`; ``fit`` names the caller in errors."""
    if not probabilities or len(probabilities) != len(labels) or (masks is not None and len(masks) != len(labels)):
        raise UserError(f"{fit} needs as many probability arrays as label arrays (and masks), at least one")
    rows, ys = [], []
    for i, (p, y) in enumerate(zip(probabilities, labels)):
        if p.shape[1:] != y.shape:
            raise UserError(f"case {i}: probabilities {p.shape} do not match labels {y.shape}")
        m = np.ones(y.shape, bool) if masks is None else np.asarray(masks[i], bool)
        rows.append(np.moveaxis(p, 0, -1)[m])
        ys.append(np.asarray(y)[m].astype(np.int64))
    p_all, y_all = np.concatenate(rows), np.concatenate(ys)
    if len(y_all) == 0:
        raise UserError(f"{fit}: no voxel selected")
    return cap_rows(p_all, y_all, seed)


def cap_rows(rows: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``rows [N, C]``, ``y [N]`` → at most 2 million of them (a seeded uniform subsample), else unchanged."""
    if len(y) > _MAX_VOXELS:
        keep = np.random.default_rng(seed).choice(len(y), _MAX_VOXELS, replace=False)
        return rows[keep], y[keep]
    return rows, y


class RowSample:
    """A seeded uniform sample, without replacement, of at most ``cap`` rows of ``n_streams`` parallel streams
    (e.g. each member of a packed ensemble on the same voxels), kept while the cases arrive, so that memory stays
    O(cap) instead of holding every case's rows until :func:`cap_rows`. Bottom-k sampling: each row draws one
    uniform key; the ``cap`` rows with the smallest keys stay, the same rows in every stream; they come out in
    arrival order. Fewer than ``cap`` rows in all: every row, exactly what concatenating them gives.
    (numpy has no streaming sampler; scikit-learn's ``sample_without_replacement`` needs the population at once.)"""

    def __init__(self, n_streams: int = 1, cap: int = _MAX_VOXELS, seed: int = 0):
        if n_streams < 1 or cap < 1:
            raise ValueError(f"RowSample needs n_streams >= 1 and cap >= 1, got {n_streams}, {cap}")
        self.n_streams, self.cap = n_streams, cap
        self._rng = np.random.default_rng(seed)
        self._rows: list[list[np.ndarray]] = [[] for _ in range(n_streams)]
        self._y: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self.seen = 0  # rows added in all

    def __len__(self) -> int:
        return min(self._held(), self.cap)

    def _held(self) -> int:
        return sum(len(y) for y in self._y)

    def add(self, rows: Sequence[np.ndarray], y: np.ndarray) -> None:
        """One case: ``rows[s] [N, C]`` of each stream on the same ``N`` voxels, labels ``y [N]``."""
        if len(rows) != self.n_streams or any(len(r) != len(y) for r in rows):
            raise ValueError(f"RowSample.add needs {self.n_streams} row arrays of len(y) = {len(y)} rows each")
        for kept, r in zip(self._rows, rows):
            kept.append(np.asarray(r))
        self._y.append(np.asarray(y))
        self._keys.append(self._rng.random(len(y)))
        self.seen += len(y)
        if self._held() > 2 * self.cap:  # compact now and then: bounded memory, linear time
            self._compact()

    def _compact(self) -> None:
        keys = np.concatenate(self._keys)
        keep = np.sort(np.argpartition(keys, self.cap - 1)[:self.cap]) if len(keys) > self.cap else slice(None)
        self._rows = [[np.concatenate(r)[keep]] for r in self._rows]
        self._y, self._keys = [np.concatenate(self._y)[keep]], [keys[keep]]

    def result(self) -> tuple[list[np.ndarray], np.ndarray]:
        """``([rows [n, C] per stream], y [n])``, n = min(rows added, cap)."""
        if not self._y:
            raise ValueError("RowSample.result: no rows were added")
        self._compact()
        return [r[0] for r in self._rows], self._y[0]


def fit_top_label_map(probabilities: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      masks: Optional[Sequence[np.ndarray]] = None, seed: int = 0) -> TopLabelMap:
    """Isotonic regression of [argmax p = label] on max p over the selected voxels of all cases.

    ``probabilities[i]`` [C, *S_i] (already temperature-scaled, if a temperature is used); ``labels[i]`` [*S_i]
    integers; ``masks[i]`` [*S_i] bool (all voxels when ``None``). At most 2 million voxels enter the fit (a
    seeded uniform subsample)."""
    return top_label_map_of_rows(*voxel_rows(probabilities, labels, masks, seed, "fit_top_label_map"))


def top_label_map_of_rows(rows: np.ndarray, y: np.ndarray) -> TopLabelMap:
    """:func:`fit_top_label_map` on voxels already selected (:func:`voxel_rows`): ``rows [N, C]``, ``y [N]``."""
    from sklearn.isotonic import IsotonicRegression
    right = (rows.argmax(1) == y).astype(np.float64)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(
        rows.max(1).astype(np.float64), right)
    return TopLabelMap(tuple(float(x) for x in iso.X_thresholds_), tuple(float(y) for y in iso.y_thresholds_))


def apply_top_label_map(probabilities: Tensor, top_label_map: TopLabelMap, dim: int = 0) -> Tensor:
    """``probabilities`` (summing to 1 over ``dim``, ≥ 2 classes) → recalibrated probabilities, float32, same
    shape and argmax: the top class gets ``a(c)`` (raised, where needed, to stay above the runner-up), the others
    share the rest in proportion to their probabilities (each plus a floor of 1e-6)."""
    p = probabilities.float()
    if p.shape[dim] < 2:
        raise UserError(f"a top-label map needs at least 2 classes along dim {dim}, got {p.shape[dim]}")
    top = p.argmax(dim, keepdim=True)  # the first of tied maxima, as numpy's and nnU-Net's argmax
    conf = p.gather(dim, top)
    others = (p + _SHARE_FLOOR).scatter(dim, top, 0.0)
    share = others / others.sum(dim, keepdim=True)  # of the non-top mass, per other class
    runner_up = share.amax(dim, keepdim=True)  # top ≥ runner-up ⟺ a ≥ r / (1 + r)
    new_top = torch.maximum(top_label_map(conf), runner_up / (1 + runner_up) + _MARGIN).clamp(max=1.0)
    return (share * (1 - new_top)).scatter(dim, top, new_top)


def apply_top_label_map_np(probabilities: np.ndarray, top_label_map: TopLabelMap, axis: int = 0) -> np.ndarray:
    """:func:`apply_top_label_map` for a numpy array ``[C, *S]`` (float32 result)."""
    return apply_top_label_map(torch.from_numpy(np.asarray(probabilities)), top_label_map, axis).numpy()
