"""Calibration and error-detection metrics of voxel-wise class probabilities (ECE, Brier, NLL, AURC).

Definitions (per voxel v with probabilities p_v [C] summing to 1, reference label y_v; the prediction is the
top label argmax_c p_v,c and its confidence is max_c p_v,c):

* **ECE**: top-label expected calibration error, ``n_bins`` (default 15) equal-width bins on [0, 1], L1:
  ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|``. Bins are left-closed ``[i/M, (i+1)/M)``, the last one
  ``[(M-1)/M, 1]`` (``searchsorted(edges, conf, 'right') - 1``, clipped). torchmetrics bins the same way except
  that it gives confidence exactly 1.0 an extra bin of its own, which matters here: float32 softmax saturates to
  1.0 on most background voxels.
* **Brier**: multiclass, ``sum_c (p_v,c - [y_v = c])^2`` averaged over voxels (0 ... 2).
* **NLL**: ``-log p_v,y_v`` averaged over voxels, with p clamped to >= ``EPS`` = 1e-12 (float32 softmax
  underflows to 0), so one voxel contributes at most 27.6 nats.
* **AURC**: area under the risk-coverage curve. Voxels are accepted in order of decreasing confidence; the risk
  at coverage k/n is the fraction of wrong voxels (top label != reference) among the k accepted, and
  ``AURC = 1/n sum_{k=1..n} risk(k)``. **Ties** (equal confidence, common: saturated probabilities) are handled
  exactly as the expectation over a uniformly random order inside each tie group, i.e. the cumulative error count
  is interpolated linearly across the group; the sum over a group has a closed form with harmonic numbers, so the
  result does not depend on voxel order and needs only the distinct confidence values, not one entry per voxel.
  ``aurc_optimal`` is the AURC of a perfect ranking with the same error count (all errors last).
* **Entropy**: predictive entropy ``-sum_c p_c log p_c`` in nats (0 log 0 = 0); the same quantity that
  ``mfs_predict --save_uncertainty`` writes as ``CASE_entropy.nii.gz``.

Pooling: :class:`CalibrationAccumulator` keeps per-bin counts and sums, metric sums and (confidence, count,
errors) per distinct confidence value, so pooling voxels of many cases gives exactly the metric of the
concatenated voxels while memory grows only with the number of distinct confidences. Voxels are processed in
chunks. Why our own code instead of torchmetrics' ``MulticlassCalibrationError``: that metric keeps every voxel's
confidence in its state (not memory-light for pooled 3D volumes) and has no Brier/AURC with exact tie handling;
its binning is reproduced here. Imports neither nnunetv2 nor torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.special import digamma

N_BINS = 15
EPS = 1e-12
CHUNK = 1 << 20  # voxels per chunk

__all__ = ["N_BINS", "EPS", "CalibrationResult", "CalibrationAccumulator", "calibration_metrics",
           "expected_dice_error", "predictive_entropy", "reference_roi", "spearman", "SpearmanResult", "harmonic_difference"]


@dataclass(frozen=True)
class CalibrationResult:
    """Metrics of one voxel set (NaN where ``n_voxels == 0``); per-bin tuples have ``n_bins`` entries."""
    n_voxels: int
    accuracy: float
    mean_confidence: float
    ece: float
    brier: float
    nll: float
    aurc: float
    aurc_optimal: float
    mean_entropy: float
    bin_count: tuple[int, ...]
    bin_accuracy: tuple[float, ...]
    bin_confidence: tuple[float, ...]

    def to_dict(self) -> dict:
        """JSON-ready dict; non-finite floats become ``None``."""
        return _json_safe(dataclasses.asdict(self))


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman rank correlation over ``n`` cases (NaN when n < 3 or an input is constant)."""
    rho: float
    p_value: float
    n: int

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def harmonic_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``H(b) - H(a) = sum_{j=a+1..b} 1/j`` for integer arrays ``0 <= a <= b`` (float64, accurate also for large
    ``a``: the asymptotic digamma series replaces the cancelling difference of two large digammas)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x, y = a + 1.0, b + 1.0
    out = digamma(y) - digamma(x)
    big = x >= 100.0
    if np.any(big):
        xs, ys = x[big], y[big]
        m = ys - xs
        # psi(z) = ln z - 1/(2z) - 1/(12 z^2) + 1/(120 z^4) - 1/(252 z^6) + O(z^-8)
        out[big] = (np.log1p(m / xs) + m / (2 * xs * ys) + m * (xs + ys) / (12 * xs ** 2 * ys ** 2)
                    - (xs ** -4 - ys ** -4) / 120 + (xs ** -6 - ys ** -6) / 252)
    return out


def _aurc(conf: np.ndarray, count: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """(AURC, optimal AURC) from distinct confidences [G] with voxel counts [G] and error counts [G]."""
    n, e_tot = float(count.sum()), float(errors.sum())
    if n == 0:
        return float("nan"), float("nan")
    order = np.argsort(-conf, kind="stable")
    m, e = count[order].astype(np.float64), errors[order].astype(np.float64)
    k0 = np.concatenate(([0.0], np.cumsum(m)[:-1]))
    e0 = np.concatenate(([0.0], np.cumsum(e)[:-1]))
    # sum_{j=1..m} (E0 + j e/m) / (k0 + j) = (E0 - k0 e/m) (H(k0+m) - H(k0)) + e
    total = float(np.sum((e0 - k0 * e / m) * harmonic_difference(k0, k0 + m) + e))
    ok = n - e_tot  # perfect ranking: ok correct voxels, then e_tot errors as one group
    optimal = float(e_tot - ok * harmonic_difference(np.array([ok]), np.array([n]))[0]) if e_tot else 0.0
    return total / n, optimal / n


class CalibrationAccumulator:
    """Streams voxels of one or many cases; :meth:`result` gives the metrics of all voxels seen so far."""

    def __init__(self, n_bins: int = N_BINS):
        self.n_bins = n_bins
        self.edges = np.linspace(0.0, 1.0, n_bins + 1)
        self.bin_count = np.zeros(n_bins, np.int64)
        self.bin_conf = np.zeros(n_bins, np.float64)
        self.bin_correct = np.zeros(n_bins, np.int64)
        self.n = 0
        self.sums = {"brier": 0.0, "nll": 0.0, "entropy": 0.0}
        self._groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, probabilities: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """Add voxels. ``probabilities`` [C, *S] (sum 1 over C), ``labels`` [*S] ints in [0, C), ``mask`` [*S]
        bool (default: all voxels)."""
        probabilities, labels = np.asarray(probabilities), np.asarray(labels)
        c = probabilities.shape[0]
        if probabilities.shape[1:] != labels.shape or (mask is not None and np.shape(mask) != labels.shape):
            raise ValueError(f"shape mismatch: probabilities {probabilities.shape}, labels {labels.shape}, "
                             f"mask {None if mask is None else np.shape(mask)}")
        p = probabilities.reshape(c, -1)
        y = labels.reshape(-1).astype(np.int64)
        if mask is not None:
            keep = np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1))
            p, y = p[:, keep], y[keep]
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"labels must lie in [0, {c}) for {c} probability channels, found {y.min()}..{y.max()}")
        for start in range(0, y.size, CHUNK):
            self._update_chunk(p[:, start:start + CHUNK].astype(np.float64), y[start:start + CHUNK])

    def _update_chunk(self, p: np.ndarray, y: np.ndarray) -> None:
        idx = np.arange(y.size)
        pred = p.argmax(0)
        conf = p[pred, idx]
        p_y = p[y, idx]
        correct = pred == y
        bins = np.clip(np.searchsorted(self.edges, conf, side="right") - 1, 0, self.n_bins - 1)
        self.bin_count += np.bincount(bins, minlength=self.n_bins)
        self.bin_conf += np.bincount(bins, weights=conf, minlength=self.n_bins)
        self.bin_correct += np.bincount(bins, weights=correct, minlength=self.n_bins).astype(np.int64)
        self.n += y.size
        self.sums["brier"] += float(np.sum(p * p) - 2.0 * p_y.sum() + y.size)
        self.sums["nll"] += float(-np.log(np.maximum(p_y, EPS)).sum())
        self.sums["entropy"] += float(predictive_entropy(p).sum())
        values, inverse = np.unique(conf, return_inverse=True)
        self._groups.append((values, np.bincount(inverse), np.bincount(inverse, weights=~correct).astype(np.int64)))

    def merge(self, other: "CalibrationAccumulator") -> None:
        """Add all voxels seen by ``other`` (same ``n_bins``)."""
        if other.n_bins != self.n_bins:
            raise ValueError("cannot merge accumulators with different n_bins")
        self.bin_count += other.bin_count
        self.bin_conf += other.bin_conf
        self.bin_correct += other.bin_correct
        self.n += other.n
        for k in self.sums:
            self.sums[k] += other.sums[k]
        self._groups.extend(other._groups)

    def _merged_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._groups:
            return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
        values, inverse = np.unique(np.concatenate([g[0] for g in self._groups]), return_inverse=True)
        count = np.bincount(inverse, weights=np.concatenate([g[1] for g in self._groups]))
        errors = np.bincount(inverse, weights=np.concatenate([g[2] for g in self._groups]))
        self._groups = [(values, count.astype(np.int64), errors.astype(np.int64))]  # compact for later calls
        return self._groups[0]

    def result(self) -> CalibrationResult:
        n = self.n
        with np.errstate(invalid="ignore", divide="ignore"):
            acc_b = self.bin_correct / self.bin_count
            conf_b = self.bin_conf / self.bin_count
        if n == 0:
            nan = float("nan")
            return CalibrationResult(0, nan, nan, nan, nan, nan, nan, nan, nan, tuple(int(x) for x in self.bin_count),
                                     tuple(acc_b.tolist()), tuple(conf_b.tolist()))
        filled = self.bin_count > 0
        ece = float(np.sum(self.bin_count[filled] / n * np.abs(acc_b[filled] - conf_b[filled])))
        aurc, aurc_opt = _aurc(*self._merged_groups())
        return CalibrationResult(
            n_voxels=int(n), accuracy=float(self.bin_correct.sum() / n), mean_confidence=float(self.bin_conf.sum() / n),
            ece=ece, brier=self.sums["brier"] / n, nll=self.sums["nll"] / n, aurc=aurc, aurc_optimal=aurc_opt,
            mean_entropy=self.sums["entropy"] / n, bin_count=tuple(int(x) for x in self.bin_count),
            bin_accuracy=tuple(float(x) for x in acc_b), bin_confidence=tuple(float(x) for x in conf_b))


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, mask: Optional[np.ndarray] = None,
                        n_bins: int = N_BINS) -> CalibrationResult:
    """Metrics of one voxel set: ``probabilities`` [C, *S], ``labels`` [*S], optional ``mask`` [*S] bool."""
    acc = CalibrationAccumulator(n_bins)
    acc.update(probabilities, labels, mask)
    return acc.result()


def predictive_entropy(probabilities: np.ndarray) -> np.ndarray:
    """``-sum_c p_c log p_c`` in nats: [C, *S] -> [*S] (float64; 0 log 0 = 0)."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=0)


def expected_dice_error(probabilities: np.ndarray, labels: Sequence[int], smooth: float = 1.0) -> float:
    """A reference-free case-level uncertainty: 1 − the mean over ``labels`` of the soft Dice between the
    probabilities of label c and the mask where c is the argmax, ``(2 Σ p_c m_c + s) / (Σ p_c + Σ m_c + s)``
    (``smooth`` s in voxels: a label that is neither predicted nor probable scores 1). ``probabilities`` [C, *S].

    It is what the model expects its own Dice error to be if its probabilities were right (a segmentation quality
    estimate in the spirit of "predicted Dice"); unlike the mean entropy it weighs uncertainty by the structure's
    size, as Dice does. Needs no reference, so it can flag cases in deployment."""
    p = np.asarray(probabilities, dtype=np.float64)
    seg = p.argmax(0)
    scores = []
    for c in labels:
        m = seg == c
        scores.append((2 * p[c][m].sum() + smooth) / (p[c].sum() + m.sum() + smooth))
    return float(1 - np.mean(scores))


def reference_roi(reference: np.ndarray, dilation: int = 3) -> np.ndarray:
    """ROI of a reference segmentation [*S]: its foreground (label > 0) dilated by ``dilation`` voxels with a cube
    (Chebyshev ball, side 2*dilation + 1, ``scipy.ndimage.binary_dilation``) -> bool [*S]. Depends on the reference
    only, so every method is scored on the same voxels; empty if the reference has no foreground."""
    fg = np.asarray(reference) > 0
    if dilation <= 0 or not fg.any():
        return fg
    return binary_dilation(fg, structure=np.ones((2 * dilation + 1,) * fg.ndim, dtype=bool))


def spearman(uncertainty: Sequence[float], error: Sequence[float]) -> SpearmanResult:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties) between per-case uncertainty
    and per-case error (e.g. 1 - mean foreground Dice); positive = more uncertain cases are worse."""
    from scipy.stats import spearmanr
    u, e = np.asarray(uncertainty, dtype=float), np.asarray(error, dtype=float)
    ok = np.isfinite(u) & np.isfinite(e)
    u, e = u[ok], e[ok]
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(e) == 0:
        return SpearmanResult(float("nan"), float("nan"), int(u.size))
    res = spearmanr(u, e)
    return SpearmanResult(float(res.statistic), float(res.pvalue), int(u.size))
