"""MedFlowSegTrainer: nnU-Net's trainer with a flow-matching objective.

Kept from nnU-Net: data loading and augmentation, optimiser and poly LR, logging and progress.png, checkpoints,
``--c`` / ``--val``, final validation and export. Changed: the network (:class:`VectorFieldUNet`, built from the
plans), the objective (:class:`FlowMatchingLoss` on x_t = (1 − t) x0 + t x1), validation (pseudo Dice of
one-step inference from a seeded prior, plus a multi-step Dice on the first batches) and the predictor used
for the final validation (:class:`MedFlowSegPredictor`). Deep supervision is off.
"""
from __future__ import annotations

import contextlib
import os
import pydoc
import sys
from typing import Iterator, Optional

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from tqdm import tqdm

from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
from medflowseg_nn.flow.label_space import segmentation_to_target
from medflowseg_nn.flow.loss import FlowMatchingLoss, interpret_output
from medflowseg_nn.flow.path import LinearPath
from medflowseg_nn.flow.solver import sample_prior
from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
from medflowseg_nn.predictor import MedFlowSegPredictor
from medflowseg_nn.segmenter import FlowSegmenter


@contextlib.contextmanager
def _swapped(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class MedFlowSegTrainer(nnUNetTrainer):
    #: one-concern variants set these class attributes instead of overriding methods:
    #: trainer attributes set after nnU-Net's __init__ (e.g. {"num_epochs": 1})
    trainer_overrides: dict = {}
    #: fields of the plans' flow_matching block (e.g. {"parameterization": "velocity"})
    flow_overrides: dict = {}
    #: fields of flow_matching.network (e.g. {"use_dbsa": False})
    network_overrides: dict = {}
    #: multi-step Euler validation Dice is computed on this many validation batches per epoch (0 = off)
    val_multistep_batches: int = 2
    val_multistep_steps: int = 4

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise NotImplementedError("MedFlowSegTrainer supports plain label maps only (no regions, no ignore "
                                      "label) — remove 'regions_class_order'/'ignore' from dataset.json")
        self.enable_deep_supervision = False
        self.save_every = 1  # checkpoint_latest after every epoch: an interrupted run loses at most one epoch
        for name, value in self.trainer_overrides.items():
            setattr(self, name, value)
        config = self.configure_flow(FlowMatchingConfig.from_plans(self.plans_manager.plans))
        n_stages = self.configuration_manager.network_arch_init_kwargs["n_stages"]
        self.flow_config = config.replace(network=config.network.resolved(n_stages))
        # the plans copied to the results folder (and read by the predictor) describe what is trained, with the
        # DBSA/FAA placement written out (not left to the code's defaults)
        self.plans_manager.plans[PLANS_KEY] = self.flow_config.to_dict()
        self.time_sampler = self.flow_config.build_time_sampler()
        self.path = LinearPath()
        self._val_batch_index = 0
        self._multistep_stats: list[np.ndarray] = []
        self._progress: Optional[tqdm] = None
        #: tqdm bar over each epoch's iterations; on by default only when stderr is a terminal
        self.show_progress = sys.stderr.isatty() and self.local_rank == 0

    def configure_flow(self, config: FlowMatchingConfig) -> FlowMatchingConfig:
        """The flow configuration to train with: the plans' block with this class's overrides applied."""
        return config.replace(**self.flow_overrides).with_network(**self.network_overrides)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The vector field for these plans: nnU-Net's architecture keywords + the flow block's network options.
        Also used by the predictor, so training and inference build the same network."""
        flow = FlowMatchingConfig.from_plans(plans_manager.plans)
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        for key in configuration_manager.network_arch_init_kwargs_req_import:
            if kwargs.get(key) is not None:
                kwargs[key] = pydoc.locate(kwargs[key])
        kwargs.update(flow.network.network_kwargs())
        return VectorFieldUNet(num_input_channels, num_output_channels, **kwargs)

    def _build_loss(self) -> nn.Module:
        c = self.flow_config
        return FlowMatchingLoss(c.parameterization, c.mse_weight, c.seg_weight, c.logit_scale)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """The vector field has a single output; nothing to switch."""

    def _do_i_compile(self) -> bool:
        return False  # FFTs and complex buffers in FAA; eager mode is what is tested

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed, so that a run killed while saving
        never leaves a truncated checkpoint behind (``--c`` then resumes from the previous one)."""
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):
            os.replace(tmp, filename)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _flow_loss(self, image: torch.Tensor, seg: torch.Tensor) -> dict[str, torch.Tensor]:
        x1 = segmentation_to_target(seg, self.label_manager.num_segmentation_heads)
        t = self.time_sampler.sample(x1.shape[0], device=x1.device)
        path = self.path.sample(torch.randn_like(x1), x1, t)
        return self.loss(self.network(image, path.x_t, t), path, seg)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.show_progress:
            self._progress = tqdm(total=self.num_iterations_per_epoch, desc=f"epoch {self.current_epoch}",
                                  leave=False, dynamic_ncols=True)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        super().on_train_epoch_end(train_outputs)

    def train_step(self, batch: dict) -> dict:
        image = batch["data"].to(self.device, non_blocking=True)
        seg = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            losses = self._flow_loss(image, seg)
        loss = losses["loss"]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            self._progress.update()
        return {"loss": loss.detach().cpu().numpy()}

    def _hard_stats(self, logits: torch.Tensor, seg: torch.Tensor) -> np.ndarray:
        """[3, K-1] foreground tp, fp, fn of the argmax of ``logits`` against ``seg`` ([B, 1, *S])."""
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        onehot.scatter_(1, logits.argmax(1, keepdim=True), 1)
        axes = [0] + list(range(2, logits.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, seg.clamp_min(0), axes=axes)
        return np.stack([v.detach().cpu().numpy()[1:] for v in (tp, fp, fn)])

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_batch_index = 0
        self._multistep_stats = []

    def validation_step(self, batch: dict) -> dict:
        """One-step inference from the seeded prior (x_t = x0, t = 0): its flow loss is the validation loss and
        its argmax gives nnU-Net's pseudo Dice. One network evaluation per batch, as in nnU-Net."""
        image = batch["data"].to(self.device, non_blocking=True)
        seg = batch["target"].to(self.device, non_blocking=True)
        num_classes = self.label_manager.num_segmentation_heads
        with torch.no_grad(), self._autocast():
            x1 = segmentation_to_target(seg, num_classes)
            x0 = sample_prior(x1.shape, self.flow_config.prior_seed, self.device)
            path = self.path.sample(x0, x1, torch.zeros(x1.shape[0], device=self.device))
            raw = self.network(image, path.x_t, path.t)
            loss = self.loss(raw, path, seg)["loss"]
            logits = interpret_output(raw, path.x_t, path.t, self.flow_config.parameterization,
                                      self.flow_config.logit_scale).logits
            if self._val_batch_index < self.val_multistep_batches:
                segmenter = FlowSegmenter(self.network, num_classes, self.flow_config.parameterization,
                                          self.flow_config.solver_config(steps=self.val_multistep_steps),
                                          self.flow_config.prior_seed, logit_scale=self.flow_config.logit_scale)
                self._multistep_stats.append(self._hard_stats(segmenter(image), seg))
        self._val_batch_index += 1
        tp, fp, fn = self._hard_stats(logits, seg)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if self._multistep_stats:
            tp, fp, fn = np.sum(self._multistep_stats, 0)
            dice = [float(2 * a / max(2 * a + b + c, 1e-8)) for a, b, c in zip(tp, fp, fn)]
            self.print_to_log_file(f"Pseudo dice ({self.val_multistep_steps}-step Euler, "
                                   f"{len(self._multistep_stats)} batches)", [round(d, 4) for d in dice])

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation, run through :class:`MedFlowSegPredictor` (one-step inference)."""
        with _swapped(nnunet_trainer_module, "nnUNetPredictor", MedFlowSegPredictor):
            super().perform_actual_validation(save_probabilities)
