"""Region models at inference: K-sample averaging of sigmoid outputs, per-region uncertainty, stitched samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.inference.sample_average import average_region_logits
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.inference.sliding_window import stitch_patches
from medflowseg_nn.inference.uncertainty import (SampleAccumulator, binary_entropy, region_disagreement,
                                                 region_entropy)
from tests.inference.test_sampler import tiny_field


def test_average_region_logits_is_the_logit_of_the_mean_probability():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 3, 5, 6, generator=g) * 6
    logits[0, 0, 0] = 80.0  # saturated: still finite
    mean = average_region_logits(logits)
    assert torch.isfinite(mean).all()
    assert torch.allclose(torch.sigmoid(mean), torch.sigmoid(logits).mean(0), atol=1e-6)
    assert torch.equal(average_region_logits(logits[:1]), logits[0])


def test_binary_entropy_and_region_disagreement_closed_forms():
    p = np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)
    h = binary_entropy(p)
    expected = [0.0, math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert np.allclose(h[0], expected, atol=1e-6)
    assert np.allclose(region_entropy(np.stack([p[0], p[0]])), 2 * np.array(expected), atol=1e-6)
    # K = 4 samples, 2 regions, 3 voxels: votes per voxel (4, 0), (2, 2), (3, 1)
    masks = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[1, 0, 1], [0, 1, 0]],
                          [[1, 0, 0], [0, 1, 1]]], dtype=torch.bool)
    d = region_disagreement(masks)
    # pairs that differ / 6 pairs: n in region -> n (K - n) / 6
    assert torch.allclose(d, torch.tensor([[0.0, 4 / 6, 3 / 6], [4 / 6, 4 / 6, 3 / 6]]))
    assert torch.equal(region_disagreement(masks[:1]), torch.zeros(2, 3))


@pytest.mark.parametrize("steps", [1, 3])
def test_flow_segmenter_multilabel_returns_region_logits_of_the_sample_mean(steps):
    field = tiny_field()  # 3 output channels: used as 3 regions
    image = torch.randn(2, 1, 8, 12, 8)
    segmenter = FlowSegmenter(field, 3, "x1", SolverConfig(steps=steps, euler_last_step=True), seed=3,
                              num_samples=3, multilabel=True)
    out = segmenter.sample(image)
    assert out.sample_log_probabilities.shape == (3, 2, 3, 8, 12, 8)
    p = segmenter.probabilities(out.sample_log_probabilities)
    assert torch.allclose(torch.sigmoid(out.mean_log_probabilities), p.mean(0), atol=1e-5)
    assert not torch.allclose(p.sum(2), torch.ones_like(p[:, :, 0]))  # independent channels, no softmax
    if steps == 1:  # one step with x1: the raw outputs are the region logits
        x0 = segmenter.prior(2, (8, 12, 8), image.device, image.dtype)
        raw = field(image.repeat(3, 1, 1, 1, 1), x0, torch.zeros(6))
        assert torch.allclose(out.sample_log_probabilities.reshape(raw.shape), raw, atol=1e-5)
    assert torch.allclose(segmenter(image), out.mean_log_probabilities)


def test_stitched_region_samples_give_per_region_disagreement():
    field = tiny_field()
    segmenter = FlowSegmenter(field, 3, "x1", SolverConfig(), seed=0, num_samples=3, multilabel=True)
    data = torch.randn(1, 8, 12, 16)
    slicers = [(slice(None), slice(0, 8), slice(0, 12), slice(0, 8)),
               (slice(None), slice(0, 8), slice(0, 12), slice(8, 16))]
    out = stitch_patches(segmenter, data, slicers, 3, [()], None, torch.device("cpu"), torch.device("cpu"),
                         with_samples=True)
    assert out.logits.shape == (3, 8, 12, 16) and out.disagreement.shape == (8, 12, 16)
    acc = SampleAccumulator(3, 3, (8, 12, 16), slicers, None, torch.device("cpu"), multilabel=True)
    with torch.inference_mode():  # the same mode as stitch_patches (the network caches tensors made in it)
        for sl in slicers:
            acc.add(segmenter.probabilities(segmenter.sample(data[sl][None]).sample_log_probabilities[:, 0]))
    per_region = acc.region_disagreement()
    assert per_region.shape == (3, 8, 12, 16) and 0 <= per_region.min() and per_region.max() <= 1
    assert torch.allclose(out.disagreement, per_region.mean(0), atol=1e-6)
    assert per_region.max() > 0  # an untrained field: the samples disagree somewhere
