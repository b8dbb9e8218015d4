"""MIMO training (``trainers.mimo``, ``MedFlowSegTrainer_mimo2`` / ``_mimo3``): each member's rows, one t per
group, a real train step through the MIMO field, the validation step on the members' mean, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medflowseg_nn.config import FlowMatchingConfig, NetworkOptions
from medflowseg_nn.errors import UserError
from medflowseg_nn.flow.path import GroupedTimeSampler, MixtureTimeSampler, build_time_sampler
from medflowseg_nn.networks.mimo import MimoVectorField
from medflowseg_nn.trainers.mimo import check_mimo_label_space, member_rows, mimo_batch
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_mimo2, MedFlowSegTrainer_mimo3
from tests.trainers.test_train_and_validation_step import make_trainer, planned, real_batches  # noqa: F401


@pytest.mark.parametrize("members", [2, 3])
def test_member_rows_keep_member_zero_in_order_and_give_every_member_the_whole_batch(members):
    rows = member_rows(7, members, torch.Generator().manual_seed(0)).reshape(7, members)
    assert torch.equal(rows[:, 0], torch.arange(7))
    for m in range(members):  # each member sees every loaded row exactly once
        assert sorted(rows[:, m].tolist()) == list(range(7))
    assert not all(torch.equal(rows[:, m], rows[:, 0]) for m in range(1, members))  # shuffled (seeded: it is)


def test_input_repetition_gives_every_member_member_zeros_row_in_the_drawn_groups():
    rows = member_rows(400, 3, torch.Generator().manual_seed(0), repetition=0.5).reshape(400, 3)
    repeated = (rows == rows[:, :1]).all(1)
    assert 150 < int(repeated.sum()) < 250  # ~half of the groups (a shuffled group repeats by chance ~never)
    assert torch.equal(rows[:, 0], torch.arange(400))
    assert torch.equal(member_rows(5, 2, repetition=1.0), torch.arange(5).repeat_interleave(2))
    with pytest.raises(ValueError, match="mimo_input_repetition"):
        FlowMatchingConfig(mimo_input_repetition=1.5)


def test_mimo_batch_indexes_image_and_every_deep_supervision_target_alike():
    image = torch.arange(4.0).reshape(4, 1, 1)
    target = [torch.arange(4.0).reshape(4, 1, 1) * 10, torch.arange(4.0).reshape(4, 1) * 100]
    gen = torch.Generator().manual_seed(1)
    img, tgt = mimo_batch(image, target, 2, generator=gen)
    assert img.shape[0] == 8 and torch.equal(tgt[0].flatten(), img.flatten() * 10)
    assert torch.equal(tgt[1].flatten(), img.flatten() * 100)
    assert torch.equal(img.flatten()[0::2], image.flatten())  # member 0: the loader's order
    assert mimo_batch(image, target, 1) == (image, target)


def test_grouped_time_sampler_draws_one_t_per_group():
    sampler = build_time_sampler("logit_normal", 0.5, group=3)
    assert isinstance(sampler, GroupedTimeSampler) and isinstance(sampler.base, MixtureTimeSampler)
    t = sampler.sample(300, generator=torch.Generator().manual_seed(0)).reshape(100, 3)
    assert bool((t == t[:, :1]).all()) and 20 < int((t[:, 0] == 0).sum()) < 80  # ~half the groups at t = 0
    with pytest.raises(ValueError, match="groups of 3"):
        sampler.sample(10)
    assert FlowMatchingConfig(network=NetworkOptions(mimo_members=2)).build_time_sampler().group == 2


def test_config_refuses_what_the_members_mean_cannot_express():
    with pytest.raises(ValueError, match="x1 parameterization"):
        FlowMatchingConfig(parameterization="velocity", own_estimate_fraction=0.0,
                           network=NetworkOptions(mimo_members=2, time_scaled_x_t=False))
    with pytest.raises(ValueError, match="own_estimate_fraction 0 or 1"):
        FlowMatchingConfig(own_estimate_fraction=0.5, network=NetworkOptions(mimo_members=2))
    with pytest.raises(ValueError, match=">= 1"):
        NetworkOptions(mimo_members=0)
    with pytest.raises(UserError, match="region labels"):
        check_mimo_label_space(2, has_regions=True)
    check_mimo_label_space(1, has_regions=True)


@pytest.mark.parametrize("cls, members", [(MedFlowSegTrainer_mimo2, 2), (MedFlowSegTrainer_mimo3, 3)])
def test_train_step_feeds_groups_at_one_t_and_updates_the_network(planned, cls, members):
    trainer = make_trainer(planned, cls)
    net = trainer.network
    assert isinstance(net, MimoVectorField) and net.members == members
    assert trainer.plans_manager.plans["flow_matching"]["network"]["mimo_members"] == members
    batch, val_batch = real_batches(trainer)
    b = batch["data"].shape[0]
    seen = []  # (image rows, x_t given, t) of each call of the MIMO field
    hook = net.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], args[1] is not None,
                                                                        args[2].clone())))
    inner_channels = []
    inner_hook = net.inner.register_forward_hook(lambda m, args, out: inner_channels.append(args[0].shape[1]))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    torch.manual_seed(0)
    loss = trainer.train_step(batch)["loss"]
    hook.remove()
    inner_hook.remove()
    assert np.isfinite(loss) and loss > 0
    # every loaded row once per member in the flow's forward (the x_t calls; the prior-free ones are own estimates)
    assert sum(rows for rows, with_x_t, _ in seen if with_x_t) == members * b
    for rows, _, t in seen:  # groups of M rows at one t; the inner field gets M images in its channels
        assert rows % members == 0 and bool((t.reshape(-1, members) == t.reshape(-1, members)[:, :1]).all())
    assert set(inner_channels) == {members * batch["data"].shape[1]}
    changed = [k for k, v in net.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) > 0.5 * len(before)
    trainer.network.eval()
    result = trainer.validation_step(val_batch)  # eval: the members' mean, one row per image
    assert np.isfinite(result["loss"]) and result["tp_hard"].shape == (2,)


def test_the_saved_plans_rebuild_the_mimo_field_for_inference(planned):
    """What a predictor does with a results folder: the base trainer class on the plans the variant saved builds
    the same MIMO field (not the variant's attribute: the plans say it), and the trained state dict loads strictly."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    trainer = make_trainer(planned, MedFlowSegTrainer_mimo2)
    saved = PlansManager(trainer.plans_manager.plans)
    net = MedFlowSegTrainer.build_network_architecture(saved, saved.get_configuration(trainer.configuration_name),
                                                       1, 3, enable_deep_supervision=False)
    assert isinstance(net, MimoVectorField) and net.members == 2
    net.load_state_dict(trainer.network.state_dict())
    image = torch.randn(2, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        out = net.eval()(image, None, torch.zeros(2))
    assert out.shape == (2, 3, *image.shape[2:]) and torch.allclose(out.exp().sum(1), torch.ones(1), atol=1e-5)
