"""Top-label isotonic recalibration: the map is sklearn's isotonic fit, it keeps the argmax, it removes a known
miscalibration that no temperature can (2D and 3D)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medflowseg_nn.calibration import CalibrationAccumulator
from medflowseg_nn.errors import UserError
from medflowseg_nn.recalibration import (RowSample, TopLabelMap, apply_top_label_map, apply_top_label_map_np,
                                         fit_top_label_map)


def miscalibrated(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary predictor whose top-label confidence c ~ U(0.5, 1) is right with probability 0.5 + 2 (c − 0.5)²:
    over-confident in the middle, right at both ends — a curve one temperature cannot straighten."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.5, 1.0, shape)
    top = rng.integers(0, 2, shape)
    right = rng.random(shape) < 0.5 + 2 * (c - 0.5) ** 2
    p1 = np.where(top == 1, c, 1 - c)
    labels = np.where(right, top, 1 - top)
    return np.stack([1 - p1, p1]).astype(np.float32), labels


def ece(probs: np.ndarray, labels: np.ndarray) -> float:
    acc = CalibrationAccumulator()
    acc.update(probs, labels, np.ones(labels.shape, bool))
    return acc.result().to_dict()["ece"]


@pytest.mark.parametrize("shape", [(120, 100), (30, 20, 20)])
def test_fit_removes_a_known_miscalibration(shape):
    probs, labels = miscalibrated(shape, seed=0)
    fitted = fit_top_label_map([probs], [labels])
    grid = torch.tensor([0.55, 0.7, 0.85, 0.95])
    assert torch.allclose(fitted(grid), 0.5 + 2 * (grid - 0.5) ** 2, atol=0.04)  # the curve it was made from
    test_probs, test_labels = miscalibrated(shape, seed=1)  # fitted on one draw, scored on another
    before, after = ece(test_probs, test_labels), ece(apply_top_label_map_np(test_probs, fitted), test_labels)
    assert before > 0.06 and after < 0.015, (before, after)


def test_the_map_is_what_sklearn_predicts():
    from sklearn.isotonic import IsotonicRegression
    rng = np.random.default_rng(3)
    conf, right = rng.uniform(0.3, 1, 5000), rng.random(5000) < rng.uniform(0.3, 1, 5000)
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(conf, right.astype(float))
    fitted = TopLabelMap(tuple(iso.X_thresholds_), tuple(iso.y_thresholds_))
    x = np.concatenate([rng.uniform(0, 1, 1000), [0.0, 1.0]])
    np.testing.assert_allclose(fitted(torch.tensor(x, dtype=torch.float32)).numpy(), iso.predict(x), atol=1e-5)


@pytest.mark.parametrize("spatial", [(9, 7), (5, 6, 4)])
@pytest.mark.parametrize("classes", [2, 4])
def test_apply_keeps_the_argmax_and_sums_to_one(spatial, classes):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(classes, *spatial, generator=g), 0)
    p[:, 0, 0] = 1 / classes  # a full tie: the first class stays the top
    harsh = TopLabelMap((0.0, 1.0), (0.0, 0.0))  # "always wrong": pushed as low as the argmax allows
    for mapping in (harsh, TopLabelMap((0.2, 0.9), (0.5, 0.8))):
        q = apply_top_label_map(p, mapping)
        assert torch.equal(q.argmax(0), p.argmax(0))
        torch.testing.assert_close(q.sum(0), torch.ones(spatial))
        assert (q >= 0).all()
    if classes == 2:  # binary: the top class gets exactly a(c) wherever a(c) keeps it on top
        mapping = TopLabelMap((0.5, 1.0), (0.6, 0.9))
        conf = p.max(0).values
        torch.testing.assert_close(apply_top_label_map(p, mapping).max(0).values, 0.6 + 0.6 * (conf - 0.5))


def test_the_identity_map_changes_nothing_but_the_floor():
    p = torch.softmax(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1)), 0)
    q = apply_top_label_map(p, TopLabelMap((0.0, 1.0), (0.0, 1.0)))
    torch.testing.assert_close(q, p, atol=1e-5, rtol=0)


def test_bad_maps_and_inputs_are_refused():
    with pytest.raises(UserError, match="increase"):
        TopLabelMap((0.5, 0.4), (0.1, 0.2))
    with pytest.raises(UserError, match="increase"):
        TopLabelMap((0.4, 0.5), (0.3, 0.2))
    with pytest.raises(UserError, match="as many"):
        TopLabelMap((0.4,), (0.3, 0.2))
    with pytest.raises(UserError, match="at least 2 classes"):
        apply_top_label_map(torch.ones(1, 3, 3), TopLabelMap((0.5,), (0.5,)))
    with pytest.raises(UserError, match="no voxel"):
        fit_top_label_map([np.full((2, 3, 3), 0.5)], [np.zeros((3, 3), int)], [np.zeros((3, 3), bool)])
    assert TopLabelMap.from_dict(TopLabelMap((0.5, 0.9), (0.6, 0.7)).to_dict()) == TopLabelMap((0.5, 0.9), (0.6, 0.7))


def test_row_sample_keeps_every_row_in_order_below_its_cap():
    sample = RowSample(n_streams=2, cap=100)
    cases = [np.arange(10 * i, 10 * i + 7, dtype=np.float32)[:, None] * [1, -1] for i in range(3)]
    for rows in cases:
        sample.add([rows, rows + 0.5], rows[:, 0].astype(np.int64))
    (a, b), y = sample.result()
    assert np.array_equal(a, np.concatenate(cases)) and np.array_equal(b, a + 0.5)
    assert np.array_equal(y, a[:, 0].astype(np.int64)) and len(sample) == sample.seen == 21


def test_row_sample_beyond_its_cap_is_uniform_the_same_rows_in_every_stream_and_seeded():
    def sampled(seed):
        sample = RowSample(n_streams=2, cap=1000, seed=seed)
        for i in range(20):  # 20 cases of 500 rows: row value = its global index
            rows = np.arange(500 * i, 500 * (i + 1), dtype=np.float64)[:, None]
            sample.add([rows, -rows], np.arange(500 * i, 500 * (i + 1)))
        return sample.result(), sample
    ((a, b), y), sample = sampled(0)
    assert len(y) == len(sample) == 1000 and sample.seen == 10_000
    assert np.array_equal(a[:, 0], y) and np.array_equal(b, -a)  # same voxels in both streams, labels along
    assert len(np.unique(y)) == 1000 and np.all(np.diff(y) > 0)  # without replacement, in arrival order
    per_case = np.bincount(y // 500, minlength=20)  # 50 expected from each case (sd ≈ 6.7)
    assert per_case.min() >= 25 and per_case.max() <= 75
    assert np.array_equal(sampled(0)[0][1], y) and not np.array_equal(sampled(1)[0][1], y)


def test_row_sample_refuses_streams_of_other_lengths_and_an_empty_result():
    sample = RowSample(n_streams=2)
    with pytest.raises(ValueError, match="2 row arrays"):
        sample.add([np.zeros((3, 2))], np.zeros(3))
    with pytest.raises(ValueError, match="2 row arrays"):
        sample.add([np.zeros((3, 2)), np.zeros((2, 2))], np.zeros(3))
    with pytest.raises(ValueError, match="no rows"):
        sample.result()
