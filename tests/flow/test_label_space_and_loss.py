import pytest
import torch

from medflowseg_nn.flow.label_space import (segmentation_to_target, target_to_log_probabilities,
                                            target_to_probabilities, target_to_segmentation)
from medflowseg_nn.flow.loss import FlowMatchingLoss, interpret_output
from medflowseg_nn.flow.path import LinearPath


@pytest.mark.parametrize("spatial", [(5, 6), (4, 5, 6)])
def test_label_round_trip(spatial):
    seg = torch.randint(0, 4, (2, 1, *spatial))
    x1 = segmentation_to_target(seg, 4)
    assert x1.shape == (2, 4, *spatial)
    assert set(x1.unique().tolist()) == {-1.0, 1.0}
    assert torch.all((x1 == 1).sum(1) == 1)
    assert torch.equal(target_to_segmentation(x1), seg[:, 0])
    p = target_to_probabilities(x1)
    assert torch.allclose(p.sum(1), torch.ones(1)) and torch.equal(p.argmax(1), seg[:, 0])
    assert torch.allclose(torch.softmax(target_to_log_probabilities(x1), 1), p, atol=1e-6)


def test_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="label 5"):
        segmentation_to_target(torch.full((1, 1, 3, 3), 5), 3)


def test_parameterizations_agree_on_the_one_step_estimate():
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([0.0, 0.4])
    raw = torch.randn(2, 3, 4, 4)
    out = interpret_output(raw, x_t, t, "x1")
    assert torch.allclose(out.x1_hat, 2 * torch.softmax(raw, 1) - 1)
    # one Euler step of the implied velocity from t lands on x1_hat
    tt = t.reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t + (1 - tt) * out.velocity, out.x1_hat, atol=1e-5)
    vel = interpret_output(raw, x_t, t, "velocity")
    assert torch.equal(vel.velocity, raw) and torch.allclose(vel.x1_hat, x_t + (1 - tt) * raw)
    with pytest.raises(ValueError):
        interpret_output(raw, x_t, t, "score")


@pytest.mark.parametrize("param", ["x1", "velocity"])
def test_loss_is_minimal_for_the_exact_answer(param):
    seg = torch.randint(0, 3, (2, 1, 6, 6))
    x1 = segmentation_to_target(seg, 3)
    x0, t = torch.randn_like(x1), torch.tensor([0.0, 0.5])
    path = LinearPath().sample(x0, x1, t)
    loss = FlowMatchingLoss(param, seg_weight=0.0)
    exact = path.velocity if param == "velocity" else 50 * x1  # large logits -> softmax ~ one-hot
    assert loss(exact, path, seg)["mse"] < 1e-6
    assert loss(torch.zeros_like(x1), path, seg)["mse"] > 0.1
    full = FlowMatchingLoss(param)(torch.zeros_like(x1, requires_grad=True), path, seg)
    full["loss"].backward()
    assert torch.isfinite(full["loss"]) and full["seg"] > 0
