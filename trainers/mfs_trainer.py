"""MedFlowSegTrainer: nnU-Net's trainer with a flow-matching objective (``medflowseg_nn.trainers.mfs_trainer``).

Kept from nnU-Net: data loading and augmentation, optimiser and poly LR, logging and progress.png, checkpoints,
``--c`` / ``--val``, final validation and export. Changed: the network (the plans' vector field), the objective
(:class:`FlowMatchingLoss` on x_t = (1 − t) x0 + t x1), validation (pseudo Dice of one-step inference from a seeded
prior, plus a multi-step Dice on the first batches), the final validation's predictor (:class:`MedFlowSegPredictor`),
then a temperature fitted on its probabilities (``fold_X/temperature.json``). Deep supervision follows the plans
(on by default): the auxiliary heads get nnU-Net's Dice + CE and weights on the t = 0 samples (:meth:`_flow_loss`).
Label spaces follow nnU-Net's label manager: plain labels (softmax), **regions** (R overlapping binary channels,
sigmoid per channel, Dice + BCE, pseudo Dice per region) and the **ignore label** (ignored voxels add nothing to
any loss, their x_t is the prior draw x0 at every t, the pseudo Dice skips them), also combined (flow.label_space).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Union

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from tqdm import tqdm

from medflowseg_nn import nnunet_compat
from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
from medflowseg_nn.flow.label_space import LabelTarget, encode_labels, encode_regions, prior_where_ignored
from medflowseg_nn.flow.loss import FlowMatchingLoss, interpret_output
from medflowseg_nn.flow.own_estimate import (label_free, one_step_estimate, own_estimate_path, own_estimate_rows,
                                             takes_prior_free)
from medflowseg_nn.flow.path import LinearPath
from medflowseg_nn.flow.solver import sample_prior
from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.model import build_vector_field, check_memory_estimate
from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.temperature import fit_validation_temperature
from medflowseg_nn.trainers.checkpoint_files import CheckpointFiles
from medflowseg_nn.trainers.label_definition import check_label_definition
from medflowseg_nn.trainers.member_temperatures import calibrate_members
from medflowseg_nn.trainers.micro_batches import accumulate_gradients, rows_of, rows_within
from medflowseg_nn.trainers.mimo import check_mimo_label_space, mimo_batch
from medflowseg_nn.trainers.validation_stats import hard_stats

#: ``[B, 1, *S]`` labels, or nnU-Net's deep-supervision list of them (full resolution first)
Target = Union[torch.Tensor, list[torch.Tensor]]


class MedFlowSegTrainer(CheckpointFiles, nnUNetTrainer):
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
    #: fit a temperature on the final validation (:func:`medflowseg_nn.temperature.fit_validation_temperature`)
    fit_temperature: bool = True
    #: CPU training: MiB of the full-resolution decoder map per micro-batch (trainers.micro_batches); None: one batch
    cpu_micro_batch_mib: Optional[float] = 64.0
    #: network rows per loaded image (a variant that trains every image twice sets 2)
    network_rows_per_image: int = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_label_definition(plans, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type != "cuda":  # nnU-Net assumes DDP means CUDA; gloo on the CPU works too
            self.device, self.grad_scaler = device, None
        if self.is_ddp:  # every rank draws its own noise and t (torch's default seed is the same in each process)
            torch.manual_seed(torch.initial_seed() + self.local_rank)
        self.save_every = 1  # checkpoint_latest after every epoch: an interrupted run loses at most one epoch
        for name, value in self.trainer_overrides.items():
            setattr(self, name, value)
        self.flow_config = self.resolved_flow_config(self.plans_manager.plans, self.configuration_manager)
        # the plans nnU-Net copies to the results folder (read by the predictor) describe what is trained, with
        # the DBSA/FAA placement written out (not left to the code's defaults); the caller's dict is not touched
        self.plans_manager.plans = {**self.plans_manager.plans, PLANS_KEY: self.flow_config.to_dict()}
        self.time_sampler = self.flow_config.build_time_sampler()
        check_mimo_label_space(self.flow_config.network.members, self.label_manager.has_regions)
        # before initialize() / get_dataloaders(): nnU-Net builds the DS targets and the network from this flag
        self.enable_deep_supervision = self.flow_config.network.deep_supervision
        self.aux_seg_loss: Optional[nn.Module] = None
        self.path = LinearPath()
        self._val_batch_index = 0
        self._multistep_stats: list[np.ndarray] = []
        self._progress: Optional[tqdm] = None
        #: tqdm bar over each epoch's iterations; on by default only when stderr is a terminal
        self.show_progress = sys.stderr.isatty() and self.local_rank == 0

    @classmethod
    def resolved_flow_config(cls, plans: dict, configuration_manager: ConfigurationManager) -> FlowMatchingConfig:
        """What this class trains on ``plans``: the plans' ``flow_matching`` block with the class's overrides
        applied and the DBSA/FAA placement written out for the configuration's stages. Pure: ``plans`` is not
        modified. Applying it to plans that already hold its result returns the same configuration."""
        config = FlowMatchingConfig.from_plans(plans).with_overrides(cls.flow_overrides, cls.network_overrides)
        n_stages = configuration_manager.network_arch_init_kwargs["n_stages"]
        return config.replace(network=config.network.resolved(n_stages))

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The vector field this class trains on these plans (nnU-Net calls it on the class or an instance); warns
        when it needs more memory than the planner sized patch and batch for. The deep supervision heads follow the
        plans (a trained state dict loads strictly); ``enable_deep_supervision`` only switches their list output."""
        config = cls.resolved_flow_config(plans_manager.plans, configuration_manager)
        check_memory_estimate(plans_manager.plans, configuration_manager, num_input_channels, num_output_channels,
                              config.network)
        network = build_vector_field(configuration_manager, num_input_channels, num_output_channels, config)
        network.set_deep_supervision(enable_deep_supervision and config.network.deep_supervision)
        return network

    def initialize(self) -> None:
        with nnunet_compat.cpu_capable_ddp():  # nnU-Net's DDP wrap, made to work for CPU modules (gloo) too
            super().initialize()

    def _build_loss(self) -> nn.Module:
        """The flow loss on the full-resolution output; also builds :attr:`aux_seg_loss` (``None`` without DS)."""
        c, regions = self.flow_config, self.label_manager.has_regions
        self.aux_seg_loss = self._build_aux_seg_loss()
        return FlowMatchingLoss(c.parameterization, c.mse_weight, c.seg_weight, c.logit_scale, ddp=self.is_ddp,
                                multilabel=regions, smoothing_sigma=c.label_smoothing_sigma, dice_weight=c.dice_weight)

    def _build_aux_seg_loss(self) -> Optional[nn.Module]:
        """nnU-Net's deep-supervision loss (``DC_and_CE_loss`` / ``DC_and_BCE_loss`` for regions, its weights, ignore
        label) with the full-resolution weight 0 (the flow loss trains it); ``None`` without DS or auxiliary weight."""
        if not self.enable_deep_supervision:
            return None
        nnunet_loss = super()._build_loss()
        weights = (0.0, *nnunet_loss.weight_factors[1:])
        return DeepSupervisionWrapper(nnunet_loss.loss, weights) if any(w != 0 for w in weights) else None

    def set_deep_supervision_enabled(self, enabled: bool) -> None:  # nnU-Net: off for final validation and export
        if self.enable_deep_supervision:
            unwrap(self.network).set_deep_supervision(enabled)

    def _do_i_compile(self) -> bool:
        return False  # FFTs and complex buffers in FAA; eager mode is what is tested

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def encode_target(self, target: torch.Tensor) -> LabelTarget:
        """nnU-Net's full-resolution target — labels ``[B, 1, *S]``, or regions ``[B, R (+1 ignore), *S]`` — in
        the flow's label space, with the ignore mask (``None`` without an ignore label)."""
        lm = self.label_manager
        if lm.has_regions:
            return encode_regions(target, lm.has_ignore_label)
        return encode_labels(target, lm.num_segmentation_heads, lm.ignore_label)

    def _flow_loss(self, image: torch.Tensor, target: Target) -> dict[str, torch.Tensor]:
        """``image`` ``[B, C, *S]``; ``target`` ``[B, 1, *S]`` (regions: ``[B, R (+1), *S]``) or the
        deep-supervision list (full resolution first). Flow loss on the full-resolution output, plus the
        deep-supervision term of :meth:`_with_aux_loss`. MIMO members: the batch in groups (``trainers.mimo``)."""
        c, multilabel = self.flow_config, self.label_manager.has_regions
        image, target = mimo_batch(image, target, c.network.members, c.mimo_input_repetition)
        encoded = self.encode_target(target[0] if isinstance(target, (list, tuple)) else target)
        x0 = torch.randn_like(encoded.x1)
        t = self.time_sampler.sample(x0.shape[0], device=x0.device)
        moved = own_estimate_rows(t, c.own_estimate_fraction, c.zero_width) if c.own_estimate_fraction else t[:0].long()
        prior_free = takes_prior_free(unwrap(self.network))
        path = own_estimate_path(self.path.sample(x0, prior_where_ignored(encoded.x1, x0, encoded.mask), t),
                                 lambda rows: one_step_estimate(self.network, image[rows], x0[rows], c.parameterization,
                                                                c.logit_scale, multilabel, prior_free),
                                 c.own_estimate_fraction, c.zero_width, rows=moved)
        raw = self.network(image, path.x_t, t)
        outputs = raw if isinstance(raw, (list, tuple)) else [raw]
        return self._with_aux_loss(self.loss(outputs[0], path, encoded.labels, encoded.mask), outputs, target, t, moved)

    def _with_aux_loss(self, losses: dict[str, torch.Tensor], outputs: list[torch.Tensor], target: Target,
                       t: torch.Tensor, moved: torch.Tensor) -> dict[str, torch.Tensor]:
        """``losses`` plus ``seg_weight`` × nnU-Net's deep-supervision loss of the heads ``outputs`` (full resolution
        first) against ``target`` (its list) on the rows drawn at t = 0 (with ``aux_on_own_estimate`` also the rows
        ``moved`` ``[M]`` onto the own path: :func:`label_free`); ``losses`` without DS. At t = 0 the output is the
        one-step estimate from the image alone; on the label's path at t > 0 a head could copy the label from x_t."""
        if self.aux_seg_loss is None or len(outputs) == 1:
            return losses
        c = self.flow_config
        rows = label_free(t, moved, c.zero_width) if c.aux_on_own_estimate else t <= c.zero_width
        # a zero that reaches every head: DDP expects a gradient for each parameter, and nnU-Net's wrapper skips
        # the heads whose weight is 0 (the lowest scale) as well as everything when no sample is at t = 0
        reach_all = sum(0.0 * o.sum() for o in outputs[1:])
        aux = reach_all + self.aux_seg_loss([o[rows] for o in outputs], [s[rows] for s in target]) \
            if bool(rows.any()) else reach_all
        return {**losses, "loss": losses["loss"] + c.seg_weight * aux, "aux": aux.detach()}

    def _to_device(self, target: Target) -> Target:
        return [s.to(self.device, non_blocking=True) for s in target] if isinstance(target, (list, tuple)) \
            else target.to(self.device, non_blocking=True)

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

    def micro_batch_rows(self, batch_size: int) -> int:
        """Loader rows per micro-batch of :meth:`train_step` (:mod:`medflowseg_nn.trainers.micro_batches`): on the
        CPU the rows whose full-resolution decoder map fits :attr:`cpu_micro_batch_mib`; else (and under DDP) all."""
        budget = self.cpu_micro_batch_mib if self.device.type == "cpu" and not self.is_ddp else None
        features = self.configuration_manager.network_arch_init_kwargs["features_per_stage"]
        return rows_within(budget, features, self.configuration_manager.patch_size, batch_size,
                           self.network_rows_per_image)

    def train_step(self, batch: dict) -> dict:
        image = batch["data"].to(self.device, non_blocking=True)
        target = self._to_device(batch["target"])
        self.optimizer.zero_grad(set_to_none=True)

        def loss_of(rows: slice) -> torch.Tensor:
            with self._autocast():
                return self._flow_loss(image[rows], rows_of(target, rows))["loss"]
        loss = accumulate_gradients(image.shape[0], self.micro_batch_rows(image.shape[0]), loss_of, self.grad_scaler)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            self._progress.update()
        return {"loss": loss.cpu().numpy()}

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_batch_index = 0
        self._multistep_stats = []

    def validation_step(self, batch: dict) -> dict:
        """One-step inference from the seeded prior (x_t = x0, t = 0): its flow loss is the validation loss and
        its argmax gives nnU-Net's pseudo Dice. One network evaluation per batch, as in nnU-Net. With deep
        supervision only the full-resolution target is used (the network is in eval mode: one output)."""
        image = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        seg = (target[0] if isinstance(target, (list, tuple)) else target).to(self.device, non_blocking=True)
        num_classes, multilabel = self.label_manager.num_segmentation_heads, self.label_manager.has_regions
        with torch.no_grad(), self._autocast():
            encoded = self.encode_target(seg)
            x0 = sample_prior(encoded.x1.shape, self.flow_config.prior_seed, self.device)
            path = self.path.sample(x0, prior_where_ignored(encoded.x1, x0, encoded.mask),
                                    torch.zeros(x0.shape[0], device=self.device))
            raw = self.network(image, path.x_t, path.t)
            loss = self.loss(raw, path, encoded.labels, encoded.mask)["loss"]
            logits = interpret_output(raw, path.x_t, path.t, self.flow_config.parameterization,
                                      self.flow_config.logit_scale, multilabel=multilabel).logits
            if self._val_batch_index < self.val_multistep_batches:
                segmenter = FlowSegmenter(self.network, num_classes, self.flow_config.parameterization,
                                          self.flow_config.solver_config(steps=self.val_multistep_steps),
                                          self.flow_config.prior_seed, logit_scale=self.flow_config.logit_scale,
                                          multilabel=multilabel)
                self._multistep_stats.append(hard_stats(segmenter(image), encoded, multilabel))
        self._val_batch_index += 1
        tp, fp, fn = hard_stats(logits, encoded, multilabel)
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if self._multistep_stats:
            tp, fp, fn = np.sum(self._multistep_stats, 0)
            dice = [float(2 * a / max(2 * a + b + c, 1e-8)) for a, b, c in zip(tp, fp, fn)]
            self.print_to_log_file(f"Pseudo dice ({self.val_multistep_steps}-step Euler, "
                                   f"{len(self._multistep_stats)} batches)", [round(d, 4) for d in dice])

    def final_validation_sampler(self) -> dict:
        """The final validation's sampler settings (plans' solver, K = 1): what its calibrations are fitted for."""
        return MedFlowSegPredictor.sampler_settings(self.flow_config.solver_config(), 1)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation through :class:`MedFlowSegPredictor` (plans' sampler, K = 1), then the fold's T
        on its probabilities (kept with ``--npz``); a packed ensemble's member T + maps instead, fitted first."""
        fit = self.fit_temperature and not self.label_manager.has_regions
        fit = fit and calibrate_members(self) is None  # no fold T + map on top of them (trainers.member_temperatures)
        with nnunet_compat.validation_predictor(MedFlowSegPredictor):
            super().perform_actual_validation(save_probabilities or fit)
        if fit and self.local_rank == 0:
            fit_validation_temperature(
                self.output_folder, os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
                self.dataset_json["file_ending"], self.final_validation_sampler(), self.label_manager.ignore_label,
                keep_probabilities=save_probabilities, checkpoint=self.weights_file)

