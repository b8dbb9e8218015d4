"""MedFlowSegPredictor: nnU-Net's predictor with the flow integrated per patch.

nnU-Net's preprocessing, sliding window (Gaussian weighting), mirroring TTA, resampling and export are used as
they are; the network it calls is a :class:`FlowSegmenter`, which turns each image patch into label
log-probabilities by integrating the learned flow from a seeded prior (1 network evaluation by default).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.segmenter import FlowSegmenter

logger = logging.getLogger(__name__)


class MedFlowSegPredictor(nnUNetPredictor):
    """Arguments as :class:`nnUNetPredictor`, plus the sampling options. ``None`` = the plans' default."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 steps: Optional[int] = None, solver: Optional[str] = None, seed: Optional[int] = None,
                 num_samples: int = 1):
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device,
                         verbose, verbose_preprocessing, allow_tqdm)
        self.steps, self.solver, self.seed, self.num_samples = steps, solver, seed, num_samples
        self.flow_config: Optional[FlowMatchingConfig] = None

    def make_segmenter(self, field: nn.Module, plans_manager: PlansManager, dataset_json: dict) -> FlowSegmenter:
        config = FlowMatchingConfig.from_plans(plans_manager.plans)
        self.flow_config = config
        num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        seed = config.prior_seed if self.seed is None else self.seed
        return FlowSegmenter(field, num_classes, config.parameterization,
                             config.solver_config(self.steps, self.solver), seed, self.num_samples,
                             config.logit_scale)

    def manual_initialization(self, network: nn.Module, plans_manager: PlansManager,
                              configuration_manager: ConfigurationManager, parameters: Optional[list],
                              dataset_json: dict, trainer_name: str,
                              inference_allowed_mirroring_axes: Optional[Sequence[int]]) -> None:
        if not isinstance(network, FlowSegmenter):
            network = self.make_segmenter(network, plans_manager, dataset_json)
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Sequence[Union[int, str]], str, None],
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        """Load a trained MedFlowSeg model. Unlike nnU-Net's version, the trainer class named in the checkpoint
        is resolved by import (nnU-Net's name search needs torchvision, which a CPU torch cannot import)."""
        from trainers import get_trainer_class

        for required in ("dataset.json", "plans.json"):
            if not isfile(join(model_training_output_dir, required)):
                raise FileNotFoundError(f"{join(model_training_output_dir, required)} not found — is "
                                        f"{model_training_output_dir} a trained model folder?")
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
            if not use_folds:
                raise FileNotFoundError(f"no fold_*/{checkpoint_name} in {model_training_output_dir} — train a "
                                        f"fold first (mfs_train) or pass -chk")
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
        dataset_json = load_json(join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(load_json(join(model_training_output_dir, "plans.json")))
        parameters, checkpoint = [], None
        for f in use_folds:
            f = f if f == "all" else int(f)
            path = join(model_training_output_dir, f"fold_{f}", checkpoint_name)
            if not isfile(path):
                raise FileNotFoundError(f"checkpoint {path} not found — train fold {f} first or pick another "
                                        f"-f / -chk")
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            checkpoint = checkpoint or ckpt
            parameters.append(ckpt["network_weights"])
        configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
        trainer_class = get_trainer_class(checkpoint["trainer_name"])
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"))
        logger.info("loaded %s (%s, folds %s) with %s", model_training_output_dir, checkpoint["trainer_name"],
                    list(use_folds), self.network.solver)


def default_num_processes() -> int:
    return int(os.environ.get("nnUNet_def_n_proc", "2"))
