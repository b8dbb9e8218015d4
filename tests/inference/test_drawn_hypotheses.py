"""Drawn hypotheses: ``draw_target`` (closed form and frequencies) and the sampler's ``hypotheses`` option."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medflowseg_nn.errors import UserError
from medflowseg_nn.flow.label_space import draw_target
from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.inference.sampler import FlowSegmenter
from tests.inference.test_sampler import SPATIAL, tiny_field


def soft(p: torch.Tensor) -> torch.Tensor:
    """Probabilities ``[B, C, *S]`` → the flow's soft estimate ``2 p - 1``."""
    return 2 * p - 1


def test_draw_target_picks_the_class_whose_cumulative_probability_passes_the_uniform():
    p = torch.tensor([0.2, 0.5, 0.3]).reshape(1, 3, 1).expand(1, 3, 4)
    u = torch.tensor([0.1, 0.3, 0.69, 0.75]).reshape(1, 1, 4)
    drawn = draw_target(soft(p), u)
    assert drawn.shape == (1, 3, 4) and drawn.dtype == p.dtype
    assert set(drawn.unique().tolist()) == {-1.0, 1.0}
    assert drawn.argmax(1).tolist() == [[0, 1, 1, 2]]
    regions = draw_target(soft(torch.full((1, 2, 3), 0.6)), torch.tensor([0.5, 0.7, 0.59]).reshape(1, 1, 3),
                          multilabel=True)
    assert regions[0].tolist() == [[1, -1, 1], [1, -1, 1]]


@pytest.mark.parametrize("multilabel", [False, True])
def test_per_voxel_draws_have_the_estimate_as_frequencies(multilabel):
    probs = torch.tensor([0.15, 0.6, 0.25])
    n = 200_000
    x = soft(probs.reshape(1, 3, 1).expand(1, 3, n))
    drawn = draw_target(x, torch.rand(1, 1, n, generator=torch.Generator().manual_seed(0)), multilabel=multilabel)
    freq = ((drawn + 1) / 2).mean(-1).flatten()
    assert torch.allclose(freq, probs, atol=0.005)


def test_a_level_draw_is_one_threshold_of_the_map():
    p_fg = torch.linspace(0.01, 0.99, 50)
    x = soft(torch.stack([1 - p_fg, p_fg]).unsqueeze(0))
    for u in (0.2, 0.5, 0.8):
        fg = draw_target(x, torch.tensor(u).reshape(1, 1, 1)).argmax(1)[0]
        assert torch.equal(fg.bool(), p_fg > 1 - u)  # background first in the cumulative order: fg where 1 - p_fg <= u


class Recording(nn.Module):
    """A time-scaled field that records (x_t, t) of every call."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field, self.calls = field, []
        self.time_scaled_x_t = True

    def forward(self, image, x_t, t):
        self.calls.append((None if x_t is None else x_t.clone(), t.clone()))
        return self.field(image, x_t, t)


def drawn_sampler(field, hypotheses: str, k: int = 4, steps: int = 2, samples_per_call=None) -> FlowSegmenter:
    return FlowSegmenter(field, 3, "x1", SolverConfig(steps, "euler"), seed=3, num_samples=k,
                         samples_per_call=samples_per_call, hypotheses=hypotheses)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *SPATIAL, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hypotheses", ["voxel", "level"])
@torch.no_grad()
def test_the_second_evaluation_sees_the_path_to_a_drawn_segmentation(image, hypotheses):
    """Euler N = 2: the input at t = 0.5 is 0.5 x0 + 0.5 h with h one-hot in {-1, 1}; 'level' draws one
    threshold per sample, the same for both patches of the batch."""
    field = tiny_field()
    field.time_scaled_x_t = True
    rec = Recording(field)
    seg = drawn_sampler(rec, hypotheses, k=2, samples_per_call=1)
    seg.sample(image)
    x0 = seg.prior(2, SPATIAL, image.device, image.dtype)
    half = [(x, t) for x, t in rec.calls if bool(t.any())]
    assert len(half) == 2 and all(torch.allclose(t, torch.full_like(t, 0.5)) for _, t in half)
    for k, (x, _) in enumerate(half):
        h = (x - 0.5 * x0[2 * k: 2 * k + 2]) / 0.5
        assert torch.allclose(h.abs(), torch.ones_like(h), atol=1e-5)
        assert torch.allclose(((h + 1) / 2).sum(1), torch.ones(2, *SPATIAL), atol=1e-5)  # one class per voxel
    drawn = [(x - 0.5 * x0[2 * k: 2 * k + 2]) / 0.5 for k, (x, _) in enumerate(half)]
    assert not torch.allclose(drawn[0], drawn[1])  # each sample its own draw


@pytest.mark.parametrize("hypotheses", ["voxel", "level"])
@torch.no_grad()
def test_drawn_samples_are_deterministic_chunking_free_and_differ(image, hypotheses):
    field = tiny_field()
    field.time_scaled_x_t = True
    one_call = drawn_sampler(field, hypotheses, samples_per_call=4).sample(image).sample_log_probabilities
    per_sample = drawn_sampler(field, hypotheses, samples_per_call=1).sample(image).sample_log_probabilities
    again = drawn_sampler(field, hypotheses, samples_per_call=1).sample(image).sample_log_probabilities
    assert torch.equal(per_sample, again)
    assert torch.allclose(one_call, per_sample, atol=1e-5)
    mean = drawn_sampler(field, "mean", samples_per_call=1).sample(image).sample_log_probabilities
    assert not torch.allclose(per_sample, mean, atol=1e-3)
    assert all(not torch.allclose(per_sample[i], per_sample[j], atol=1e-3) for i in range(4) for j in range(i))


@torch.no_grad()
def test_one_step_and_the_mean_setting_are_unchanged(image):
    field = tiny_field()
    field.time_scaled_x_t = True
    for steps in (1, 2):
        mean = drawn_sampler(field, "mean", steps=steps).sample(image).mean_log_probabilities
        default = FlowSegmenter(field, 3, "x1", SolverConfig(steps, "euler"), seed=3,
                                num_samples=4).sample(image).mean_log_probabilities
        assert torch.equal(mean, default)
    one_step_drawn = drawn_sampler(field, "voxel", steps=1).sample(image).mean_log_probabilities
    assert torch.equal(one_step_drawn, drawn_sampler(field, "mean", steps=1).sample(image).mean_log_probabilities)


def test_unknown_hypotheses_are_refused_and_named_in_the_temperature_settings():
    with pytest.raises(ValueError, match="hypotheses"):
        FlowSegmenter(tiny_field(), 3, "x1", hypotheses="median")
    with pytest.raises(UserError, match="--hypotheses"):
        MedFlowSegPredictor(device=torch.device("cpu"), hypotheses="median")
    solver = SolverConfig(2, "euler")
    assert MedFlowSegPredictor.sampler_settings(solver, 4) == {"steps": 2, "solver": "euler", "num_samples": 4}
    assert MedFlowSegPredictor.sampler_settings(solver, 4, "level")["hypotheses"] == "level"
