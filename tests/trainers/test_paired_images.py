"""``MedFlowSegTrainer_pairedImages``: each loaded image at t = 0 and on its own one-step path, in one step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medflowseg_nn.errors import UserError

from medflowseg_nn.trainers.paired_images import MedFlowSegTrainer_pairedImages, twice
from tests.conftest import tiny_network_plans
from tests.trainers.test_train_and_validation_step import CONFIG, make_trainer, planned, real_batches  # noqa: F401


def test_twice_stacks_tensors_and_deep_supervision_lists():
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(twice(x), torch.cat([x, x]))
    ds = twice([x, x[:, :1]])
    assert [tuple(s.shape) for s in ds] == [(4, 3), (4, 1)] and torch.equal(ds[1][2:], x[:, :1])


def test_the_loader_yields_half_the_plans_batch_and_the_network_sees_each_image_twice(planned):
    trainer = make_trainer(planned, MedFlowSegTrainer_pairedImages)
    assert trainer.batch_size == math.ceil(trainer.configuration_manager.batch_size / 2)
    saved = trainer.plans_manager.plans["flow_matching"]  # the plans it saves say what the step trains
    assert saved["zero_fraction"] == 0.5 and saved["own_estimate_fraction"] == 1.0
    batch, _ = real_batches(trainer)
    image = batch["data"].float()
    n = image.shape[0]
    assert n == trainer.batch_size
    calls = []
    hook = trainer.network.register_forward_hook(
        lambda m, args, out: calls.append([a if a is None else a.detach().clone() for a in args] + [out[0].detach()]))
    priors, path = [], trainer.path
    trainer.path = type("P", (), {"sample": lambda self, x0, x1, t: priors.append(x0) or path.sample(x0, x1, t)})()
    torch.manual_seed(0)
    losses = trainer._flow_loss(image, [s.float() for s in batch["target"]])
    hook.remove()
    assert torch.isfinite(losses["loss"])
    (image0, x_t0, t0, raw0), (image1, x_t1, t1, _) = calls
    # first forward: every loaded image at t = 0, prior-free (the time-scaled field takes x_t=None there)
    assert torch.equal(image0, image) and x_t0 is None and torch.equal(t0, torch.zeros(n))
    # second forward: the same images at t > 0, on the line from a second prior draw to the first's own estimate
    assert torch.equal(image1, image) and bool((t1 > 0).all())
    x0 = priors[-1]
    assert x0.shape[0] == 2 * n
    tt = t1.reshape(-1, *[1] * (x_t1.ndim - 1))
    expected = (1 - tt) * x0[n:] + tt * (2 * torch.softmax(raw0.float(), 1) - 1)
    assert torch.allclose(x_t1, expected, atol=1e-5)
    trainer.path = path


def test_train_step_updates_the_network(planned):
    trainer = make_trainer(planned, MedFlowSegTrainer_pairedImages)
    batch, _ = real_batches(trainer)
    before = {k: v.detach().clone() for k, v in trainer.network.named_parameters()}
    torch.manual_seed(0)
    loss = trainer.train_step(batch)["loss"]
    assert np.isfinite(loss) and loss > 0
    changed = [k for k, v in trainer.network.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) > 0.5 * len(before)


@pytest.mark.parametrize("key", ["mimo_members", "ensemble_members"])
def test_mimo_and_ensemble_members_are_refused_because_this_step_does_not_group_rows(planned, key):
    plans = tiny_network_plans(planned.plans)
    plans["flow_matching"] = {**plans.get("flow_matching", {}),
                              "network": {**plans.get("flow_matching", {}).get("network", {}), key: 2}}
    with pytest.raises(UserError, match=key):
        MedFlowSegTrainer_pairedImages(plans, CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
