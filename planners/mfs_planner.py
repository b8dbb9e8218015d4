"""MedFlowSegPlanner: nnU-Net's experiment planner with the flow network's memory cost and a flow block.

Everything nnU-Net plans (spacing, normalisation, patch and batch size, 2d / 3d_fullres / 3d_lowres) is kept;
two things change:

* the network class in the plans is :class:`VectorFieldUNet`, and the VRAM estimate that drives patch/batch
  size is computed on it — its feature maps include the time modulation, the conditioning encoder and the
  DBSA/FAA buffers — plus the input tensor with its extra ``num_classes`` x_t channels, which nnU-Net's
  estimate ignores;
* the plans get a ``flow_matching`` block (:class:`~medflowseg_nn.config.FlowMatchingConfig`).

Import as ``medflowseg_nn.planners.mfs_planner`` (the repository folder ``planners/`` is installed under the
``medflowseg_nn`` namespace). Preprocessor and data identifiers stay nnU-Net's, so preprocessed data is shared with a plain nnU-Net run.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from medflowseg_nn import nnunet_compat
from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
from medflowseg_nn.model import MEMORY_ESTIMATE_KEY
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet

PLANS_IDENTIFIER = "MedFlowSegPlans"


class MedFlowSegPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = PLANS_IDENTIFIER,
                 overwrite_target_spacing: Optional[Sequence[float]] = None, suppress_transpose: bool = False,
                 flow_config: Optional[FlowMatchingConfig] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = VectorFieldUNet
        self.flow_config = flow_config or FlowMatchingConfig()

    def static_estimate_VRAM_usage(self, patch_size: Tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: Tuple[str, ...]) -> np.int64:
        """Feature-map elements of the flow network for this patch (nnU-Net's planner unit).

        Deliberately an instance method (nnU-Net calls it through ``self``): it needs the flow block's network
        options. nnU-Net's own estimate builds the network named in the plans — ours — and sums its
        ``compute_conv_feature_map_size``; we add the input tensor (image ⊕ x_t channels).
        """
        kwargs = dict(arch_kwargs, **self.flow_config.network.network_kwargs())
        with nnunet_compat.nonzero_da_threads():
            estimate = super().static_estimate_VRAM_usage(patch_size, input_channels, output_channels,
                                                          arch_class_name, kwargs, arch_kwargs_req_import)
        return np.int64(estimate) + np.prod([input_channels + output_channels, *patch_size], dtype=np.int64)

    def save_plans(self, plans: dict) -> None:
        plans[PLANS_KEY] = self.flow_config.to_dict()
        # what patch and batch size were sized for; the trainer warns when it trains a costlier network
        plans[MEMORY_ESTIMATE_KEY] = {"network": self.flow_config.to_dict()["network"]}
        super().save_plans(plans)
