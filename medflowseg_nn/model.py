"""The one place where a vector field is built from nnU-Net plans and a resolved flow configuration.

Used by the trainer (``build_network_architecture``), the predictor (loading a trained model) and the
benchmarks, so that training and inference always build the same network. Which configuration a trainer
*variant* trains with is resolved by the trainer class (``MedFlowSegTrainer.resolved_flow_config``); what a
trained model was trained with is the block in its results folder's ``plans.json``.

May be imported by everything above ``medflowseg_nn.networks`` (inference, cli, planners, trainers, benchmarks).
"""
from __future__ import annotations

import logging
import pydoc
from typing import Any, Optional, Union

from dynamic_network_architectures.building_blocks.helper import get_matching_dropout

from medflowseg_nn.config import FlowMatchingConfig, NetworkOptions
from medflowseg_nn.networks.layers import conv_ndim
from medflowseg_nn.networks.member_ensemble import MemberEnsembleField, member_width_features
from medflowseg_nn.networks.mimo import MimoVectorField
from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet, per_stage

logger = logging.getLogger(__name__)

#: top-level plans key where the planner records the network options its VRAM estimate was computed for
MEMORY_ESTIMATE_KEY = "flow_matching_memory_estimate"


def architecture_kwargs(configuration_manager: Any, network: NetworkOptions) -> dict[str, Any]:
    """nnU-Net's architecture keywords of a configuration (classes imported) + the flow network's options."""
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    kwargs.update(network.network_kwargs())
    if network.dropout > 0:  # channel dropout as nnU-Net's dropout_op; the helper takes the dimension (given a
        # conv_op it asserts, dynamic_network_architectures 0.4.4)
        kwargs["dropout_op"] = get_matching_dropout(dimension=conv_ndim(kwargs["conv_op"]))
        kwargs["dropout_op_kwargs"] = {"p": network.dropout, "inplace": False}
    return kwargs


def vector_field_class(arch_kwargs: dict[str, Any]) -> type[VectorFieldUNet]:
    """The vector-field class for a configuration's architecture keywords: the residual encoder for the keywords of
    nnU-Net's ResEnc planners (``n_blocks_per_stage``, as ``ResidualEncoderUNet`` takes), else the plain one."""
    return ResidualEncoderVectorFieldUNet if "n_blocks_per_stage" in arch_kwargs else VectorFieldUNet


def build_vector_field(configuration_manager: Any, num_input_channels: int, num_output_channels: int,
                       flow_config: FlowMatchingConfig) -> Union[VectorFieldUNet, MimoVectorField, MemberEnsembleField]:
    """The vector field ``v(image [B, num_input_channels, *P], x_t [B, num_output_channels, *P], t [B])`` for a
    configuration of nnU-Net plans (its ``ConfigurationManager``) and a flow configuration.

    ``num_input_channels`` counts every channel the network sees besides x_t: the image channels, plus for a
    cascade stage the previous stage's one-hot foreground labels (nnU-Net's ``determine_num_input_channels``);
    the network's first convolution takes ``num_input_channels + num_output_channels`` (M times both for
    ``network.mimo_members`` = M > 1: the :class:`MimoVectorField` of M members, same signature;
    ``network.ensemble_members`` = M > 1: the :class:`MemberEnsembleField` of M networks ``member_width`` as wide)."""
    return network_for(architecture_kwargs(configuration_manager, flow_config.network), num_input_channels,
                       num_output_channels, flow_config.network)


def network_for(kwargs: dict[str, Any], num_input_channels: int, num_output_channels: int,
                network: NetworkOptions) -> Union[VectorFieldUNet, MimoVectorField, MemberEnsembleField]:
    """:func:`build_vector_field` from the architecture keywords of :func:`architecture_kwargs`."""
    cls = vector_field_class(kwargs)
    if network.ensemble_members > 1:
        narrow = {**kwargs, "features_per_stage": member_width_features(
            per_stage(kwargs["features_per_stage"], kwargs["n_stages"]), network.member_width)}
        return MemberEnsembleField([cls(num_input_channels, num_output_channels, **narrow)
                                    for _ in range(network.ensemble_members)])
    members = network.mimo_members
    field = cls(members * num_input_channels, members * num_output_channels, **kwargs)
    return MimoVectorField(field, members) if members > 1 else field


def feature_map_size(configuration_manager: Any, num_input_channels: int, num_output_channels: int,
                     network: NetworkOptions) -> int:
    """Activation elements the planner's estimate counts for one patch of this configuration (batch 1)."""
    net = network_for(architecture_kwargs(configuration_manager, network), num_input_channels, num_output_channels,
                      network)
    return int(net.compute_conv_feature_map_size(configuration_manager.patch_size))


def check_memory_estimate(plans: dict, configuration_manager: Any, num_input_channels: int,
                          num_output_channels: int, network: NetworkOptions) -> Optional[float]:
    """Compare ``network`` with the options the planner sized patch and batch for (recorded in the plans).

    Returns the ratio of activation elements (trained / planned), ``None`` when the plans record no estimate;
    logs a warning when the network to train needs more than the planner counted."""
    planned = plans.get(MEMORY_ESTIMATE_KEY)
    if planned is None:
        return None
    n_stages = configuration_manager.network_arch_init_kwargs["n_stages"]
    planned_net = NetworkOptions(**planned["network"]).resolved(n_stages)
    if planned_net == network.resolved(n_stages):
        return 1.0
    ratio = feature_map_size(configuration_manager, num_input_channels, num_output_channels, network) / \
        feature_map_size(configuration_manager, num_input_channels, num_output_channels, planned_net)
    if ratio > 1.0:
        logger.warning("the flow_matching.network options to train (%s) need %.2fx the activation memory the "
                       "planner sized patch %s and batch %s for (%s); rerun mfs_plan_and_preprocess with these "
                       "options, or expect out-of-memory errors on a GPU of the planned size",
                       network, ratio, configuration_manager.patch_size, configuration_manager.batch_size,
                       planned_net)
    return ratio
