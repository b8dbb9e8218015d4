"""Each one-concern trainer variant changes what it claims, on fresh plans of a planned synthetic dataset.

The plans dict is loaded from disk for every test (never one a trainer has touched): the variants are class
attributes resolved by ``MedFlowSegTrainer.resolved_flow_config``, which must be pure, and the plans a trainer
will save to its results folder (``trainer.plans_manager.plans``) must describe the network it trains.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
from medflowseg_nn.flow.loss import FlowMatchingLoss
from medflowseg_nn.flow.path import LinearPath
from medflowseg_nn.model import build_vector_field
from medflowseg_nn.networks.dual_branch_spatial_attention import DualBranchSpatialAttention
from medflowseg_nn.networks.frequency_aware_attention import FrequencyAwareAttention
from medflowseg_nn.networks.layers import stage_indices
from medflowseg_nn.trainers import variants
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from tests.conftest import plan_synthetic_dataset

CONFIG = "3d_fullres"
ALL_CLASSES = [MedFlowSegTrainer] + [getattr(variants, n) for n in sorted(vars(variants))
                                     if n.startswith("MedFlowSegTrainer_")]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Plans (no preprocessing) of a tiny 3D synthetic dataset; env vars stay set for the module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        yield plan_synthetic_dataset(tmp_path_factory.mktemp("variants"), mp, 981, num_train=3, preprocess=False)


def fresh(planned) -> tuple[dict, PlansManager]:
    plans = json.loads(planned.plans_file.read_text())
    return plans, PlansManager(plans)


def attention_modules(net: torch.nn.Module) -> tuple[int, int]:
    mods = list(net.modules())
    return (sum(isinstance(m, DualBranchSpatialAttention) for m in mods),
            sum(isinstance(m, FrequencyAwareAttention) for m in mods))


def make_trainer(cls, planned, plans: dict):
    plans["continue_training"] = False  # what mfs_train / nnU-Net's run_training put in (the trainer pops it)
    return cls(plans, CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))


@pytest.mark.parametrize("cls,has_dbsa,has_faa", [
    (MedFlowSegTrainer, True, True), (variants.MedFlowSegTrainer_noDBSA, False, True),
    (variants.MedFlowSegTrainer_noFAA, True, False), (variants.MedFlowSegTrainer_noAttention, False, False),
    (variants.MedFlowSegTrainer_velocity, True, True), (variants.MedFlowSegTrainer_uniformTime, True, True)])
def test_network_has_exactly_the_attention_modules_the_variant_claims(planned, cls, has_dbsa, has_faa):
    plans, pm = fresh(planned)
    net = cls.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 3, False)
    n_dbsa, n_faa = attention_modules(net)
    assert (n_dbsa > 0, n_faa > 0) == (has_dbsa, has_faa), (n_dbsa, n_faa)
    n_stages = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["n_stages"]
    if has_dbsa:  # the default placement: the deepest skip only
        assert n_dbsa == 1 and sorted(net.dbsa) == [str(n_stages - 2)]
    if has_faa:  # the two lowest-resolution stages
        assert n_faa == 2 and sorted(net.faa) == [str(n_stages - 2), str(n_stages - 1)]


def test_dropout_variant_puts_channel_dropout_after_every_unet_convolution(planned):
    plans, pm = fresh(planned)
    convs = [m for m in variants.MedFlowSegTrainer_dropout.build_network_architecture(
        pm, pm.get_configuration(CONFIG), 1, 3, False).modules() if hasattr(m, "all_modules")]
    assert convs and all(isinstance(m.dropout, torch.nn.Dropout3d) and m.dropout.p == 0.1 for m in convs)
    default = MedFlowSegTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 3, False)
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in default.modules())


def test_deep_dropout_variant_thins_only_the_two_deepest_stages(planned):
    plans, pm = fresh(planned)
    n_stages = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["n_stages"]
    net = variants.MedFlowSegTrainer_deepDropout.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 3,
                                                                            False)
    deep = [n_stages - 2, n_stages - 1]
    assert net.dropout_stages == deep

    def thinned(part: torch.nn.Module) -> bool:
        return any(isinstance(m, torch.nn.Dropout3d) and m.p == 0.1 for m in part.modules())
    assert [thinned(stage) for stage in net.encoder] == [s in deep for s in range(n_stages)]
    decoder_stages = range(n_stages - 2, -1, -1)  # the decoder runs from the deepest skip up
    assert [thinned(stage) for stage in net.decoder] == [s in deep for s in decoder_stages]
    assert [thinned(stage) for stage in net.cond_encoder] == [s in deep for s in range(len(net.cond_encoder))]
    saved = make_trainer(variants.MedFlowSegTrainer_deepDropout, planned, plans).plans_manager.plans[PLANS_KEY]
    assert saved["network"]["dropout_stages"] == deep  # the saved plans name the stages, not "the deepest two"


@pytest.mark.parametrize("cls,p,stages", [(variants.MedFlowSegTrainer_shallowDropout, 0.1, [0]),
                                           (variants.MedFlowSegTrainer_lightDropout, 0.05, None)])
def test_shallow_and_light_dropout_thin_what_they_claim(planned, cls, p, stages):
    plans, pm = fresh(planned)
    n_stages = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["n_stages"]
    net = cls.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 3, False)
    thinned_stages = range(n_stages) if stages is None else stages
    assert [any(isinstance(m, torch.nn.Dropout3d) and m.p == p for m in stage.modules()) for stage in net.encoder] \
        == [s in thinned_stages for s in range(n_stages)]
    assert not any(isinstance(m, torch.nn.Dropout3d) and m.p != p for m in net.modules())


def test_label_smoothing_variant_builds_a_smoothing_loss(planned):
    trainer = make_trainer(variants.MedFlowSegTrainer_spatialLabelSmoothing, planned, fresh(planned)[0])
    assert trainer.plans_manager.plans[PLANS_KEY]["label_smoothing_sigma"] == 1.0  # saved with the model
    assert trainer._build_loss().smoothing_sigma == 1.0
    assert make_trainer(MedFlowSegTrainer, planned, fresh(planned)[0])._build_loss().smoothing_sigma == 0.0


@pytest.mark.parametrize("cls, weight", [(variants.MedFlowSegTrainer_noDice, 0.0),
                                         (variants.MedFlowSegTrainer_diceWeight2, 2.0)])
def test_dice_weight_variants_build_their_loss(planned, cls, weight):
    trainer = make_trainer(cls, planned, fresh(planned)[0])
    assert trainer.plans_manager.plans[PLANS_KEY]["dice_weight"] == weight  # saved with the model
    assert trainer._build_loss().dice_weight == weight
    assert make_trainer(MedFlowSegTrainer, planned, fresh(planned)[0])._build_loss().dice_weight == 1.0


@pytest.mark.parametrize("stages", [[4], [-5], [1, -3]])
def test_dropout_stages_outside_the_network_or_twice_are_refused(stages):
    from medflowseg_nn.config import NetworkOptions
    with pytest.raises(ValueError, match="dropout_stages"):  # [1, -3] is stage 1 twice in a 4-stage network
        NetworkOptions(dropout=0.1, dropout_stages=stages).resolved(4)
    with pytest.raises(ValueError, match="dropout_stages"):  # the network's own check is the same function
        stage_indices(stages, 4, "dropout_stages")
    assert stage_indices([-2, -1], 4, "dropout_stages") == [2, 3]


def test_velocity_variant_trains_and_losses_the_velocity_parameterization(planned):
    plans, pm = fresh(planned)
    cm = pm.get_configuration(CONFIG)
    assert MedFlowSegTrainer.resolved_flow_config(plans, cm).parameterization == "x1"
    for cls in (variants.MedFlowSegTrainer_velocity, variants.MedFlowSegTrainer_velocityUniformTime):
        assert cls.resolved_flow_config(plans, cm).parameterization == "velocity"
        # x1 − x0 at t = 0 needs x0: the velocity variants see the plain x_t, not t · x_t
        assert not cls.resolved_flow_config(plans, cm).network.time_scaled_x_t
        trainer = make_trainer(cls, planned, fresh(planned)[0])
        loss = trainer._build_loss()
        assert isinstance(loss, FlowMatchingLoss) and loss.parameterization == "velocity"
        # behaviour, not only the attribute: the exact target velocity has zero flow MSE under 'velocity' only
        x0, seg = torch.randn(2, 3, 4, 5, 4), torch.randint(0, 3, (2, 1, 4, 5, 4))
        x1 = torch.nn.functional.one_hot(seg[:, 0], 3).movedim(-1, 1).float() * 2 - 1
        path = LinearPath().sample(x0, x1, torch.tensor([0.0, 0.5]))
        assert loss(path.velocity, path, seg)["mse"] < 1e-10
        assert FlowMatchingLoss("x1")(path.velocity, path, seg)["mse"] > 0.1
    default = make_trainer(MedFlowSegTrainer, planned, fresh(planned)[0])._build_loss()
    assert default.parameterization == "x1"


@pytest.mark.parametrize("cls,zero_share", [(MedFlowSegTrainer, 0.5), (variants.MedFlowSegTrainer_uniformTime, 0.0),
                                            (variants.MedFlowSegTrainer_velocityUniformTime, 0.0),
                                            (variants.MedFlowSegTrainer_velocity, 0.5),
                                            (variants.MedFlowSegTrainer_oneStepOnly, 1.0)])
def test_time_sampler_mass_at_zero(planned, cls, zero_share):
    trainer = make_trainer(cls, planned, fresh(planned)[0])
    torch.manual_seed(0)
    t = trainer.time_sampler.sample(20000)
    assert t.shape == (20000,) and 0 <= t.min() and t.max() < 1
    share = (t == 0).float().mean().item()
    if zero_share == 0:
        assert share == 0.0
        assert abs(t.mean().item() - 0.5) < 0.02 and abs(t.var().item() - 1 / 12) < 0.005  # U(0, 1)
    else:
        assert abs(share - zero_share) < 0.02


@pytest.mark.parametrize("cls,fraction", [(MedFlowSegTrainer, 1.0), (variants.MedFlowSegTrainer_labelPath, 0.0),
                                          (variants.MedFlowSegTrainer_ownEstimate, 0.5),
                                          (variants.MedFlowSegTrainer_velocity, 0.0),
                                          (variants.MedFlowSegTrainer_uniformTime, 0.0)])
def test_own_estimate_fraction_of_fresh_plans(planned, cls, fraction):
    """Fresh plans carry the planner's default (own-estimate training on); the label-path variants turn it off."""
    plans, pm = fresh(planned)
    assert plans[PLANS_KEY]["own_estimate_fraction"] == 1.0
    assert make_trainer(cls, planned, plans).flow_config.own_estimate_fraction == fraction


def test_resolved_flow_config_is_pure_and_idempotent(planned):
    plans, pm = fresh(planned)
    cm = pm.get_configuration(CONFIG)
    before = copy.deepcopy(plans)
    for cls in ALL_CLASSES:
        config = cls.resolved_flow_config(plans, cm)
        assert plans == before, cls.__name__
        assert config.network.dbsa_stages is not None and config.network.faa_stages is not None
        for key, value in cls.flow_overrides.items():
            assert getattr(config, key) == value
        n_stages = cm.network_arch_init_kwargs["n_stages"]
        for key, value in cls.network_overrides.items():  # stages counted from the deepest are written out
            assert getattr(config.network, key) == ([s % n_stages for s in value] if key == "dropout_stages"
                                                    else value)
        again = cls.resolved_flow_config({**plans, PLANS_KEY: config.to_dict()}, cm)
        assert again == config, cls.__name__
    assert plans[PLANS_KEY]["network"]["dbsa_stages"] is None  # the planner leaves the default placement open


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_trainer_saves_the_resolved_block_and_leaves_the_callers_plans_alone(planned, cls):
    plans, pm = fresh(planned)
    cm = pm.get_configuration(CONFIG)
    expected = cls.resolved_flow_config(plans, cm).to_dict()
    plans["continue_training"] = False
    before = copy.deepcopy(plans)
    trainer = cls(plans, CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    # nnU-Net 2.8's trainer pops 'continue_training' from the dict it is given; nothing else may change
    del before["continue_training"]
    assert plans == before
    saved = trainer.plans_manager.plans[PLANS_KEY]
    assert saved == expected
    assert isinstance(saved["network"]["dbsa_stages"], list) and isinstance(saved["network"]["faa_stages"], list)
    assert trainer.flow_config == FlowMatchingConfig.from_dict(saved)
    for name, value in cls.trainer_overrides.items():
        assert getattr(trainer, name) == value
    # the predictor builds from the saved block alone: the same network the variant trains
    saved_pm = PlansManager(trainer.plans_manager.plans)
    rebuilt = build_vector_field(saved_pm.get_configuration(CONFIG), 1, 3, FlowMatchingConfig.from_plans(
        trainer.plans_manager.plans))
    trained = cls.build_network_architecture(PlansManager(fresh(planned)[0]), cm, 1, 3, False)
    assert attention_modules(rebuilt) == attention_modules(trained)
    assert rebuilt.state_dict().keys() == trained.state_dict().keys()
