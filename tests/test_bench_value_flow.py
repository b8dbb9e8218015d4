"""bench_value's ``--flow KEY=VALUE`` overrides: parsed into the plans' flow_matching block, checked by
FlowMatchingConfig, and part of our models' cache names (not nnU-Net's)."""
from __future__ import annotations

import argparse
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import value_models  # noqa: E402


def test_parse_nested_json_values():
    got = value_models.parse_flow_overrides(["network.time_scaled_x_t=true", "own_estimate_fraction=0.5",
                                             "time_sampler=uniform"])
    assert got == {"network": {"time_scaled_x_t": True}, "own_estimate_fraction": 0.5, "time_sampler": "uniform"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        value_models.parse_flow_overrides(["own_estimate_fraction"])


def test_overrides_reach_the_plans_and_the_cache_name(monkeypatch):
    from medflowseg_nn.config import FlowMatchingConfig
    old_block = {"parameterization": "x1", "network": {"deep_supervision": True}}  # written before the defaults
    plans = {"configurations": {"2d": {"batch_size": 12}}, "flow_matching": old_block}
    monkeypatch.setattr(value_models.C, "load_plans", lambda name: (plans, {}))
    args = argparse.Namespace(configuration="2d", batch_size=3, ours_trainer="MedFlowSegTrainer",
                              flow=["own_estimate_fraction=1.0", "network.time_scaled_x_t=true"], budget_tag="b")
    got, _ = value_models.load_bench_plans("any", args)
    config = FlowMatchingConfig.from_plans(got)
    assert got["configurations"]["2d"]["batch_size"] == 3
    assert config.own_estimate_fraction == 1.0 and config.network.time_scaled_x_t and config.network.deep_supervision
    assert value_models.model_tag("ours", 0, 1, args) == \
        "MedFlowSegTrainer_network.time_scaled_x_t=true_own_estimate_fraction=1.0_f0_s1_b"
    assert value_models.model_tag("nnunet", 0, 1, args) == "nnunet_f0_s1_b"
    args.flow = ["network.no_such_option=1"]
    with pytest.raises(ValueError, match="unknown keys"):
        value_models.load_bench_plans("any", args)
