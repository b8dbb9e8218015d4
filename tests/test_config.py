import json
import re

import pytest

from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
from medflowseg_nn.flow.path import MixtureTimeSampler
from tests.conftest import REPO_ROOT


def test_round_trip_through_plans():
    c = FlowMatchingConfig().replace(zero_fraction=0.25).with_network(use_faa=False)
    plans = {PLANS_KEY: c.to_dict()}
    assert FlowMatchingConfig.from_plans(plans) == c
    assert FlowMatchingConfig.from_plans({}) == FlowMatchingConfig()
    assert c.network.network_kwargs()["faa_stages"] == []


def test_defaults_put_mass_at_t0_and_one_step():
    c = FlowMatchingConfig()
    assert isinstance(c.build_time_sampler(), MixtureTimeSampler)
    assert c.solver_config().steps == 1 and c.solver_config(steps=4, method="heun").num_evaluations == 7


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="parameterization"):
        FlowMatchingConfig(parameterization="eps")
    with pytest.raises(ValueError, match="unknown keys"):
        FlowMatchingConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="flow_matching.network"):
        FlowMatchingConfig.from_dict({"network": {"use_attention": False}})
    with pytest.raises(ValueError):
        FlowMatchingConfig(solver="rk4")
    # an option that would change nothing: the DS heads on own-path samples without own-path samples, e.g. the
    # trainer variant on a block written before the own-estimate default (which means fraction 0)
    with pytest.raises(ValueError, match="aux_on_own_estimate needs own_estimate_fraction > 0"):
        FlowMatchingConfig.from_dict({"parameterization": "x1"}).replace(aux_on_own_estimate=True)
    assert FlowMatchingConfig(aux_on_own_estimate=True).own_estimate_fraction == 1.0


def test_resolved_writes_out_default_placements_only():
    net = FlowMatchingConfig().network
    assert (net.dbsa_stages, net.faa_stages) == (None, None)
    r = net.resolved(5)
    assert (r.dbsa_stages, r.faa_stages) == ([3], [3, 4])
    assert r.network_kwargs() == {**net.network_kwargs(), "dbsa_stages": [3], "faa_stages": [3, 4]}
    explicit = net.__class__(dbsa_stages=[1, 2], faa_stages=[], use_faa=False).resolved(5)
    assert (explicit.dbsa_stages, explicit.faa_stages, explicit.network_kwargs()["faa_stages"]) == ([1, 2], [], [])
    assert FlowMatchingConfig.from_dict(FlowMatchingConfig(network=r).to_dict()).network == r


def test_time_scaled_input_is_the_default_and_blocks_written_before_keep_the_plain_input():
    assert FlowMatchingConfig().network.time_scaled_x_t  # the default since 2026-12-03
    assert FlowMatchingConfig.from_dict(None).network.time_scaled_x_t  # plans without a block: the default
    fresh = FlowMatchingConfig().to_dict()
    assert FlowMatchingConfig.from_dict(fresh).network.time_scaled_x_t
    old = {**fresh, "network": {k: v for k, v in fresh["network"].items() if k != "time_scaled_x_t"}}
    assert not FlowMatchingConfig.from_dict(old).network.time_scaled_x_t
    assert not FlowMatchingConfig.from_dict({"steps": 2}).network.time_scaled_x_t
    assert FlowMatchingConfig().network.network_kwargs()["time_scaled_x_t"]


def test_readme_shows_the_block_the_planner_writes():
    """The README's ``flow_matching`` example is the default block, every key (it had fallen behind: two keys
    were missing)."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"### The plans' `flow_matching` block\s+```json\s+(.*?)```", readme, re.S)
    assert block is not None
    assert json.loads("{" + block.group(1) + "}")[PLANS_KEY] == FlowMatchingConfig().to_dict()


def test_path_mean_is_off_by_default_and_an_argument_overrides_the_plans():
    off = FlowMatchingConfig()
    assert not off.path_mean and not off.solver_config(steps=2).path_mean
    on = FlowMatchingConfig.from_dict({**off.to_dict(), "path_mean": True})
    assert on.solver_config(steps=2).path_mean and not on.solver_config(steps=2, path_mean=False).path_mean
    assert off.solver_config(path_mean=True).path_mean
