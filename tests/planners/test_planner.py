"""``MedFlowSegPlanner``: its VRAM estimate (the number nnU-Net sizes patch and batch with), the plans it saves,
and ``medflowseg_nn.model.check_memory_estimate`` which the trainer runs against what the planner recorded."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from types import SimpleNamespace

import pytest
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn import nnunet_compat
from medflowseg_nn.cli import plan_and_preprocess
from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig, NetworkOptions
from medflowseg_nn.model import MEMORY_ESTIMATE_KEY, architecture_kwargs, check_memory_estimate
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from medflowseg_nn.planners.mfs_planner import MedFlowSegPlanner
from medflowseg_nn.synthetic import make_synthetic_dataset
from tests.conftest import set_nnunet_env

DATASET = 983
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
IN_CH, OUT_CH = 1, 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Fingerprint and plans (no preprocessing) of a tiny 3D synthetic dataset; env vars set for the module."""
    root = tmp_path_factory.mktemp("planner")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", DATASET, num_train=3, shape=(16, 20, 16))
        assert plan_and_preprocess.main(["-d", str(DATASET), "-c", "3d_fullres", "-np", "1", "--no_pp",
                                         "--no_verify"]) == 0
        pre = root / "nnUNet_preprocessed" / raw.name
        yield SimpleNamespace(pre=pre, plans=json.loads((pre / "MedFlowSegPlans.json").read_text()))


def arch(planned, configuration="3d_fullres"):
    a = planned.plans["configurations"][configuration]["architecture"]
    return copy.deepcopy(a["arch_kwargs"]), tuple(a["_kw_requires_import"])


def ours(planner, patch, kwargs, req):
    return int(planner.static_estimate_VRAM_usage(tuple(patch), IN_CH, OUT_CH, VectorFieldUNet.__module__ +
                                                  ".VectorFieldUNet", kwargs, req))


def plain(patch, kwargs, req):
    with nnunet_compat.nonzero_da_threads():  # the fixture sets nnUNet_n_proc_DA=0, which nnU-Net cannot take
        return int(ExperimentPlanner.static_estimate_VRAM_usage(tuple(patch), IN_CH, OUT_CH, PLAIN_UNET, kwargs,
                                                                req))


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_estimate_exceeds_nnunets_plain_unet_and_grows_with_the_patch(planned, configuration):
    planner = MedFlowSegPlanner(DATASET)
    kwargs, req = arch(planned, configuration)
    patch = planned.plans["configurations"][configuration]["patch_size"]
    estimate, reference = ours(planner, patch, kwargs, req), plain(patch, kwargs, req)
    assert estimate > reference > 0
    bigger = [2 * p for p in patch]
    assert ours(planner, bigger, kwargs, req) > estimate
    # a patch with twice the voxels costs about twice as much, as for nnU-Net's network
    ratio = ours(planner, [patch[0] * 2, *patch[1:]], kwargs, req) / estimate
    assert 1.8 < ratio < 2.2
    assert kwargs == arch(planned, configuration)[0]  # the plans' kwargs are not modified


def test_estimate_is_the_flow_networks_feature_maps_plus_the_input_tensor(planned):
    planner = MedFlowSegPlanner(DATASET)
    kwargs, req = arch(planned)
    patch = (16, 20, 16)
    net = VectorFieldUNet(IN_CH, OUT_CH, **architecture_kwargs(
        SimpleNamespace(network_arch_init_kwargs=kwargs, network_arch_init_kwargs_req_import=req),
        planner.flow_config.network))
    feature_maps = int(net.compute_conv_feature_map_size(patch))
    assert ours(planner, patch, kwargs, req) == feature_maps + math.prod([IN_CH + OUT_CH, *patch])


def test_estimate_follows_the_planners_network_options(planned):
    kwargs, req = arch(planned)
    patch = planned.plans["configurations"]["3d_fullres"]["patch_size"]
    default = ours(MedFlowSegPlanner(DATASET), patch, kwargs, req)
    bare = ours(MedFlowSegPlanner(DATASET, flow_config=FlowMatchingConfig().with_network(use_dbsa=False,
                                                                                         use_faa=False)),
                patch, kwargs, req)
    every_skip = ours(MedFlowSegPlanner(DATASET, flow_config=FlowMatchingConfig().with_network(
        dbsa_stages=list(range(kwargs["n_stages"] - 1)))), patch, kwargs, req)
    assert bare < default < every_skip
    assert bare > plain(patch, kwargs, req)  # time modulation + input channels even without DBSA/FAA


def test_planned_plans_have_the_flow_block_and_the_estimates_network(planned):
    assert planned.plans[PLANS_KEY] == FlowMatchingConfig().to_dict()
    assert planned.plans[MEMORY_ESTIMATE_KEY] == {"network": FlowMatchingConfig().to_dict()["network"]}
    for c in planned.plans["configurations"].values():
        assert c["architecture"]["network_class_name"] == "medflowseg_nn.networks.vector_field_unet.VectorFieldUNet"


def test_save_plans_writes_the_planners_own_flow_config(planned):
    config = FlowMatchingConfig().with_overrides(
        {"parameterization": "velocity", "steps": 4, "own_estimate_fraction": 0.0},
        {"use_faa": False, "dbsa_stages": [0, 1], "time_scaled_x_t": False})
    planner = MedFlowSegPlanner(DATASET, plans_name="CustomPlans", flow_config=config)
    plans = copy.deepcopy(planned.plans)
    plans.pop(PLANS_KEY), plans.pop(MEMORY_ESTIMATE_KEY)
    plans["plans_name"] = "CustomPlans"
    planner.save_plans(plans)
    saved = json.loads((planned.pre / "CustomPlans.json").read_text())
    assert FlowMatchingConfig.from_plans(saved) == config
    assert saved[MEMORY_ESTIMATE_KEY] == {"network": {**dataclasses.asdict(NetworkOptions()), "use_faa": False,
                                                      "dbsa_stages": [0, 1], "time_scaled_x_t": False}}
    assert saved["configurations"] == planned.plans["configurations"]


def test_check_memory_estimate(planned, caplog):
    pm = PlansManager(copy.deepcopy(planned.plans))
    cm = pm.get_configuration("3d_fullres")
    n = cm.network_arch_init_kwargs["n_stages"]
    recorded = FlowMatchingConfig.from_plans(planned.plans).network
    with caplog.at_level(logging.WARNING, logger="medflowseg_nn.model"):
        assert check_memory_estimate(pm.plans, cm, IN_CH, OUT_CH, recorded) == 1.0
        # the default placement written out is the same network as the recorded "None"
        assert check_memory_estimate(pm.plans, cm, IN_CH, OUT_CH, recorded.resolved(n)) == 1.0
        assert not caplog.records
        cheaper = check_memory_estimate(pm.plans, cm, IN_CH, OUT_CH, NetworkOptions(use_dbsa=False))
        assert cheaper is not None and cheaper < 1.0 and not caplog.records
        costlier = NetworkOptions(dbsa_stages=list(range(n - 1)))  # DBSA on every skip connection
        ratio = check_memory_estimate(pm.plans, cm, IN_CH, OUT_CH, costlier)
    assert ratio is not None and ratio > 1.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "medflowseg_nn.model"]
    assert len(warnings) == 1 and f"{ratio:.2f}x" in warnings[0].getMessage()
    assert "mfs_plan_and_preprocess" in warnings[0].getMessage()
    without = {k: v for k, v in pm.plans.items() if k != MEMORY_ESTIMATE_KEY}
    assert check_memory_estimate(without, cm, IN_CH, OUT_CH, costlier) is None
