"""MedFlowSeg presets of nnU-Net's residual-encoder planners: ``MedFlowSegPlannerResEncM`` / ``L`` / ``XL``.

Each is nnU-Net's ``nnUNetPlannerResEncM`` / ``L`` / ``XL`` (its GPU memory target of 8 / 24 / 40 GB, reference
values, block counts per stage ``(1, 3, 4, 6, 6, ...)``, its ``get_plans_for_configuration`` and data identifiers,
so 2d / 3d_fullres data are shared with ``nnUNetPlans``) with :class:`MedFlowSegPlanner`'s changes: the network
in the plans is :class:`ResidualEncoderVectorFieldUNet` (residual ``BasicBlockD`` encoder, DBSA / FAA / time
modulation as in the plain vector field), the VRAM estimate that sizes patch and batch is computed on it (plus
the image ⊕ x_t input tensor), and the plans get the ``flow_matching`` block. Plans identifiers follow nnU-Net's
``nnUNetResEncUNet{M,L,XL}Plans``: ``MedFlowSegResEncUNetMPlans``, ``...LPlans``, ``...XLPlans``.

``mfs_plan_and_preprocess -d D -pl MedFlowSegPlannerResEncM``, then ``mfs_train D C F -p MedFlowSegResEncUNetMPlans``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncL, nnUNetPlannerResEncM, nnUNetPlannerResEncXL)

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.planners.mfs_planner import MedFlowSegPlanner


class MedFlowSegPlannerResEncM(MedFlowSegPlanner, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc M preset (8 GB) for the flow network; plans ``MedFlowSegResEncUNetMPlans``."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "MedFlowSegResEncUNetMPlans",
                 overwrite_target_spacing: Optional[Sequence[float]] = None, suppress_transpose: bool = False,
                 flow_config: Optional[FlowMatchingConfig] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, flow_config)
        self.UNet_class = ResidualEncoderVectorFieldUNet


class MedFlowSegPlannerResEncL(MedFlowSegPlanner, nnUNetPlannerResEncL):
    """nnU-Net's ResEnc L preset (24 GB) for the flow network; plans ``MedFlowSegResEncUNetLPlans``."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 24,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "MedFlowSegResEncUNetLPlans",
                 overwrite_target_spacing: Optional[Sequence[float]] = None, suppress_transpose: bool = False,
                 flow_config: Optional[FlowMatchingConfig] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, flow_config)
        self.UNet_class = ResidualEncoderVectorFieldUNet


class MedFlowSegPlannerResEncXL(MedFlowSegPlanner, nnUNetPlannerResEncXL):
    """nnU-Net's ResEnc XL preset (40 GB) for the flow network; plans ``MedFlowSegResEncUNetXLPlans``."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 40,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "MedFlowSegResEncUNetXLPlans",
                 overwrite_target_spacing: Optional[Sequence[float]] = None, suppress_transpose: bool = False,
                 flow_config: Optional[FlowMatchingConfig] = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose, flow_config)
        self.UNet_class = ResidualEncoderVectorFieldUNet
