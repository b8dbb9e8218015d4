"""Own-estimate training points (medflowseg_nn.flow.own_estimate), closed form."""
from __future__ import annotations

import pytest
import torch

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.flow.own_estimate import label_free, one_step_estimate, own_estimate_path, own_estimate_rows
from medflowseg_nn.flow.path import LinearPath


def draw(spatial=(4, 5), batch=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, classes, *spatial, generator=g)
    x1 = torch.nn.functional.one_hot(torch.randint(0, classes, (batch, *spatial), generator=g), classes)
    t = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.9, 0.7])[:batch]
    return LinearPath().sample(x0, x1.movedim(-1, 1).float() * 2 - 1, t)


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)], ids=["2d", "3d"])
def test_picked_rows_lie_between_the_prior_and_the_estimate(spatial):
    path = draw(spatial)
    constant = torch.full((1, 3, *spatial), 0.25)
    calls = []

    def estimate(rows):
        calls.append(rows.clone())
        return constant.expand(rows.numel(), *constant.shape[1:])

    moved = own_estimate_path(path, estimate, fraction=1.0)
    (rows,) = calls
    assert rows.tolist() == [1, 3, 4, 5]  # every t > 0 sample, never the t = 0 ones
    for r in range(6):
        t = path.t[r]
        expected = (1 - t) * path.x0[r] + t * 0.25 if r in rows.tolist() else path.x_t[r]
        assert torch.allclose(moved.x_t[r], expected, atol=1e-6)
    for name in ("x0", "x1", "t", "velocity"):  # the targets stay the ground truth
        assert getattr(moved, name) is getattr(path, name)
    assert not torch.equal(moved.x_t, path.x_t)


def test_fraction_zero_is_the_plain_path_and_never_calls_the_estimate():
    path = draw()
    assert own_estimate_path(path, lambda rows: pytest.fail("called"), fraction=0.0) is path


def test_given_rows_are_the_ones_moved_and_label_free_marks_them_and_t0():
    path = draw()
    moved = own_estimate_path(path, lambda rows: torch.zeros(rows.numel(), 3, 4, 5), fraction=1.0,
                              rows=torch.tensor([3]))
    assert torch.equal(moved.x_t[3], (1 - path.t[3]) * path.x0[3])
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(moved.x_t[keep], path.x_t[keep])
    # t = [0, .2, 0, .5, .9, .7]: label-free = the t = 0 rows and the moved one; zero_width widens "t = 0"
    assert label_free(path.t, torch.tensor([3])).tolist() == [True, False, True, True, False, False]
    assert label_free(path.t, torch.tensor([], dtype=torch.long), 0.2).tolist() == [True, True, True] + [False] * 3


def test_rows_share_and_zero_width():
    t = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    rows = own_estimate_rows(t, 0.5, zero_width=0.2, generator=torch.Generator().manual_seed(2))
    assert bool((t[rows] > 0.2).all())
    assert abs(rows.numel() / (t > 0.2).sum().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        own_estimate_rows(t, 1.5)


def test_no_gradient_reaches_the_estimate_and_shapes_are_checked():
    path = draw()
    weight = torch.ones((), requires_grad=True)
    moved = own_estimate_path(path, lambda rows: weight * torch.zeros(rows.numel(), 3, 4, 5), fraction=1.0)
    assert not moved.x_t.requires_grad
    with pytest.raises(ValueError, match="expected"):
        own_estimate_path(path, lambda rows: torch.zeros(rows.numel(), 2, 4, 5), fraction=1.0)


def test_one_step_estimate_is_the_x1_mask_of_the_full_resolution_output():
    image, x0 = torch.randn(2, 1, 4, 5), torch.randn(2, 3, 4, 5)
    logits = torch.randn(2, 3, 4, 5)
    seen = {}

    def field(img, x, t):
        seen.update(image=img, x=x, t=t)
        return [logits, logits[..., ::2, ::2]]  # a deep-supervision list: full resolution first

    x1_hat = one_step_estimate(field, image, x0, "x1")
    assert torch.allclose(x1_hat, 2 * torch.softmax(logits, 1) - 1)
    assert seen["x"] is x0 and seen["image"] is image and torch.equal(seen["t"], torch.zeros(2))
    regions = one_step_estimate(lambda i, x, t: logits, image, x0, "x1", multilabel=True)
    assert torch.allclose(regions, 2 * torch.sigmoid(logits) - 1)


def test_one_step_estimate_prior_free_calls_the_field_without_the_prior():
    image, x0, logits = torch.randn(2, 1, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    seen = {}

    def field(img, x, t):
        seen.update(x=x)
        return logits

    x1_hat = one_step_estimate(field, image, x0, "x1", prior_free=True)
    assert seen["x"] is None and torch.allclose(x1_hat, 2 * torch.softmax(logits, 1) - 1)


def test_config_keeps_the_option_and_refuses_it_for_velocity():
    config = FlowMatchingConfig(own_estimate_fraction=0.5)
    assert FlowMatchingConfig.from_dict(config.to_dict()) == config
    assert FlowMatchingConfig().own_estimate_fraction == 1.0  # the default since 2026-12-03
    assert FlowMatchingConfig.from_dict(None).own_estimate_fraction == 1.0  # plans without a block: the default
    old = {k: v for k, v in FlowMatchingConfig().to_dict().items() if k != "own_estimate_fraction"}
    assert FlowMatchingConfig.from_dict(old).own_estimate_fraction == 0.0  # a block written before: off
    assert FlowMatchingConfig.from_dict({"parameterization": "velocity"}).own_estimate_fraction == 0.0
    with pytest.raises(ValueError, match="x1 parameterization"):
        FlowMatchingConfig(parameterization="velocity", own_estimate_fraction=0.5)
    with pytest.raises(ValueError, match="time_scaled_x_t false"):  # a full planner block with only the output changed
        FlowMatchingConfig().replace(parameterization="velocity", own_estimate_fraction=0.0)
    plain = FlowMatchingConfig().with_overrides({"parameterization": "velocity", "own_estimate_fraction": 0.0},
                                                {"time_scaled_x_t": False})
    assert plain.parameterization == "velocity" and not plain.network.time_scaled_x_t
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FlowMatchingConfig(own_estimate_fraction=-0.1)
