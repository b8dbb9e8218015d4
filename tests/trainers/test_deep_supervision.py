"""Deep supervision of the vector field (``MedFlowSegTrainer_deepSupervision``) on a planned synthetic dataset.

The network is made 4 stages deep in the plans (3 would leave no auxiliary weight: nnU-Net zeroes the lowest
scale), small for speed. Batches come from the trainer's own nnU-Net dataloaders (list targets).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.model import build_vector_field
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from medflowseg_nn.trainers.variants import (MedFlowSegTrainer_auxOwnEstimate, MedFlowSegTrainer_deepSupervision,
                                              MedFlowSegTrainer_noDeepSupervision, MedFlowSegTrainer_labelPath)
from tests.conftest import plan_synthetic_dataset

CONFIG = "3d_fullres"
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield plan_synthetic_dataset(tmp_path_factory.mktemp("deep_supervision"), mp, 984)


def four_stage_plans(planned) -> dict:
    plans = copy.deepcopy(planned.plans)
    arch = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]
    assert plans["configurations"][CONFIG]["patch_size"] == [16, 20, 16]
    arch.update(n_stages=4, features_per_stage=[4, 8, 16, 16], kernel_sizes=[[3, 3, 3]] * 4,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 1, 2]], n_conv_per_stage=[1] * 4,
                n_conv_per_stage_decoder=[1] * 3)
    plans["continue_training"] = False
    return plans


def make_trainer(planned, cls=MedFlowSegTrainer_deepSupervision):
    trainer = cls(four_stage_plans(planned), CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_variant_builds_heads_on_fresh_plans_and_records_the_option(planned):
    plans = four_stage_plans(planned)
    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIG)
    ds = MedFlowSegTrainer_deepSupervision.build_network_architecture(pm, cm, 1, NUM_CLASSES)
    plain = MedFlowSegTrainer_noDeepSupervision.build_network_architecture(pm, cm, 1, NUM_CLASSES)
    assert len(ds.aux_heads) == 2 and ds.deep_supervision and len(plain.aux_heads) == 0
    # nnU-Net's predictor asks for no deep supervision: same heads (strict loading), list output off
    off = MedFlowSegTrainer_deepSupervision.build_network_architecture(pm, cm, 1, NUM_CLASSES, False)
    assert len(off.aux_heads) == 2 and not off.deep_supervision
    assert plans == four_stage_plans(planned)  # pure
    assert FlowMatchingConfig.from_plans(plans).network.deep_supervision  # the planner's default (on)
    assert len(MedFlowSegTrainer.build_network_architecture(pm, cm, 1, NUM_CLASSES).aux_heads) == 2


def test_aux_weights_are_nnunets(planned):
    trainer = make_trainer(planned)
    assert trainer.enable_deep_supervision
    nnunet_loss = nnUNetTrainer._build_loss(trainer)  # nnU-Net's own deep-supervision loss for these plans
    scales = trainer._get_deep_supervision_scales()
    assert len(scales) == 3
    expected = np.array([1 / 2 ** i for i in range(3)])
    expected[-1] = 0
    expected /= expected.sum()
    assert np.allclose(nnunet_loss.weight_factors, expected)
    # the full-resolution weight is 0 (the flow loss trains that output); the others are nnU-Net's
    assert trainer.aux_seg_loss.weight_factors == (0.0, *nnunet_loss.weight_factors[1:])
    assert trainer.aux_seg_loss.weight_factors[1] == pytest.approx(1 / 3)
    assert type(trainer.aux_seg_loss.loss) is type(nnunet_loss.loss)
    assert make_trainer(planned, MedFlowSegTrainer_noDeepSupervision).aux_seg_loss is None


def test_train_step_with_list_targets_and_aux_loss_at_t0_only(planned):
    trainer = make_trainer(planned)
    train_loader, val_loader = trainer.get_dataloaders()
    batch = next(train_loader)
    target = batch["target"]
    assert isinstance(target, list) and len(target) == 3
    assert [tuple(s.shape[2:]) for s in target] == [(16, 20, 16), (8, 10, 8), (4, 5, 4)]
    trainer.network.train()
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and out["loss"] > 0

    class Fixed:
        def __init__(self, value: float):
            self.value = value

        def sample(self, batch_size, device="cpu", generator=None):
            return torch.full((batch_size,), self.value, device=device)

    with torch.no_grad():
        trainer.time_sampler = Fixed(0.0)
        at_zero = trainer._flow_loss(batch["data"], target)
        trainer.time_sampler = Fixed(0.5)
        later = trainer._flow_loss(batch["data"], target)
    assert at_zero["aux"] > 0 and torch.isfinite(at_zero["loss"])
    assert later["aux"] == 0  # t > 0: by default the heads are trained at t = 0 only
    assert at_zero["loss"] == pytest.approx((at_zero["mse"] + at_zero["seg"] + at_zero["aux"]).item(), rel=1e-5)

    # DDP (find_unused_parameters=False) needs a gradient for every parameter, also the lowest head whose weight
    # nnU-Net sets to 0 and every head when no sample is at t = 0
    for value in (0.0, 0.5):
        trainer.time_sampler = Fixed(value)
        trainer.network.zero_grad(set_to_none=True)
        trainer._flow_loss(batch["data"], target)["loss"].backward()
        unused = [n for n, p in trainer.network.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, (value, unused)

    # validation: eval mode, full-resolution target of the list
    trainer.val_multistep_steps = 1
    trainer.on_validation_epoch_start()
    val = trainer.validation_step(next(val_loader))
    assert np.isfinite(val["loss"]) and val["tp_hard"].shape == (NUM_CLASSES - 1,)


class FixedTime:
    def __init__(self, value: float):
        self.value = value

    def sample(self, batch_size, device="cpu", generator=None):
        return torch.full((batch_size,), self.value, device=device)


def test_aux_on_own_estimate_trains_the_heads_on_the_own_path_samples_too(planned):
    own = make_trainer(planned, MedFlowSegTrainer_auxOwnEstimate)
    assert own.flow_config.aux_on_own_estimate and own.flow_config.own_estimate_fraction == 1.0
    batch = next(own.get_dataloaders()[0])
    own.time_sampler = FixedTime(0.5)  # every sample at t > 0, all of them moved onto the own path
    with torch.no_grad():
        assert own._flow_loss(batch["data"], batch["target"])["aux"] > 0
    # without own-estimate training (the label's path, nothing moved) the option would change nothing: refused
    label_path = make_trainer(planned, MedFlowSegTrainer_labelPath)
    with pytest.raises(ValueError, match="aux_on_own_estimate needs own_estimate_fraction > 0"):
        label_path.flow_config.replace(aux_on_own_estimate=True)
    # and with the option off, the t > 0 samples (which show the label there) train no head
    label_path.time_sampler = FixedTime(0.5)
    with torch.no_grad():
        assert label_path._flow_loss(batch["data"], batch["target"])["aux"] == 0


def test_ds_trained_state_dict_loads_strictly_into_the_inference_network(planned):
    trainer = make_trainer(planned)
    trainer.set_deep_supervision_enabled(False)
    assert not trainer.network.deep_supervision
    trainer.network.train()
    shape = (1, 1, 16, 20, 16)
    image, x_t, t = torch.randn(shape), torch.randn(1, NUM_CLASSES, *shape[2:]), torch.zeros(1)
    assert isinstance(trainer.network(image, x_t, t), torch.Tensor)
    trainer.set_deep_supervision_enabled(True)
    assert isinstance(trainer.network(image, x_t, t), list)

    # what the predictor builds: the block of the plans the trainer saves to the results folder
    saved_plans = trainer.plans_manager.plans
    config = FlowMatchingConfig.from_plans(saved_plans)
    assert config.network.deep_supervision
    cm = PlansManager(saved_plans).get_configuration(CONFIG)
    inference = build_vector_field(cm, 1, NUM_CLASSES, config)
    inference.load_state_dict(trainer.network.state_dict(), strict=True)
    inference.eval()
    trainer.network.eval()
    with torch.no_grad():
        assert torch.equal(inference(image, x_t, t), trainer.network(image, x_t, t))
