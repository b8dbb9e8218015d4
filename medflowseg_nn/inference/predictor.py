"""MedFlowSegPredictor: nnU-Net's predictor with the flow sampler per patch.

nnU-Net's preprocessing, sliding-window slicers, Gaussian weighting, mirroring TTA, fold ensembling, resampling
and export are used as they are; the network it evaluates per patch is a :class:`FlowSegmenter` (seeded prior →
label log-probabilities; K samples one batched network evaluation on a GPU, one per sample on CPU). Only public
``nnUNetPredictor`` methods are overridden: ``manual_initialization``, ``initialize_from_trained_model_folder``
(no trainer-name search, which needs torchvision), ``predict_logits_from_preprocessed_data`` and
``predict_sliding_window_return_logits`` (both
through :meth:`MedFlowSegPredictor.predict_case`, which also returns the K-sample disagreement as a value).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import dummy_context, empty_cache
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import Tensor, nn

from medflowseg_nn import nnunet_compat
from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.errors import UserError
from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.inference.member_calibration import check_member_maps, member_field, predict_members
from medflowseg_nn.inference.model_samples import dropout_layers
from medflowseg_nn.inference.sampler import HYPOTHESES, FlowSegmenter
from medflowseg_nn.inference.sliding_window import CasePrediction, stitch_patches
from medflowseg_nn.inference.uncertainty import mask_votes_disagreement, votes_disagreement
from medflowseg_nn.model import build_vector_field
from medflowseg_nn.temperature import FoldCalibration, load_calibration

logger = logging.getLogger(__name__)


class MedFlowSegPredictor(nnUNetPredictor):
    """Arguments as :class:`nnUNetPredictor`, plus the sampling options (``None`` = the plans' default):
    ``steps`` and ``solver`` of the ODE, prior ``seed`` (sample k uses seed + k), ``num_samples`` K,
    ``hypotheses`` (what the steps before the last move towards: ``sampler.HYPOTHESES``), ``path_mean`` (the
    mean of the steps' clean estimates instead of the last, ``SolverConfig.path_mean``), ``model_samples``
    (each sample through its own thinned network: MC dropout of a model trained with dropout), and
    ``use_temperature``: recalibrate each fold's logits with what was fitted on its validation
    (``fold_X/temperature.json``, :mod:`medflowseg_nn.temperature`: the temperature, then the top-label map when
    the file has one) when it was fitted for these sampler settings. Only probabilities change; a single fold's
    segmentation is the same."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 steps: Optional[int] = None, solver: Optional[str] = None, seed: Optional[int] = None,
                 num_samples: int = 1, use_temperature: bool = True, hypotheses: str = "mean",
                 model_samples: bool = False, path_mean: Optional[bool] = None):
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device,
                         verbose, verbose_preprocessing, allow_tqdm)
        if num_samples < 1:
            raise UserError(f"--num_samples must be >= 1, got {num_samples}")
        if hypotheses not in HYPOTHESES:
            raise UserError(f"--hypotheses must be one of {', '.join(HYPOTHESES)}, got {hypotheses!r}")
        self.steps, self.solver, self.seed, self.num_samples = steps, solver, seed, num_samples
        self.hypotheses, self.model_samples, self.path_mean = hypotheses, model_samples, path_mean
        self.use_temperature = use_temperature
        #: per entry of ``list_of_parameters``: its calibration or None (set when loading a model folder)
        self.fold_calibrations: list[Optional[FoldCalibration]] = []
        self._loaded: Optional[tuple[dict, int]] = None  # (state dict, weights_state) loaded last: load_parameters

    def weights_state(self) -> int:
        """Sum of the network parameters' in-place versions: any load or optimiser step changes it."""
        return sum(p._version for p in self.segmenter.parameters())

    def load_parameters(self, params: dict) -> None:
        """Load one fold's state dict into the network, unless it is the one loaded last and the weights have not
        changed since: nnU-Net reloads every fold for every case, which with one fold copies the same weights
        once per case (measured ~0.05–0.2 s a case on 2 CPU cores)."""
        if self._loaded is not None and self._loaded[0] is params and self._loaded[1] == self.weights_state():
            return
        self.segmenter.load_state_dict(params)
        self._loaded = (params, self.weights_state())

    @staticmethod
    def sampler_settings(solver: SolverConfig, num_samples: int, hypotheses: str = "mean",
                         model_samples: bool = False) -> dict:
        """What a fitted temperature holds for: ODE steps, method, K, drawn hypotheses, model samples and the path
        mean (each named only when not the default, so temperatures fitted before the option existed still match);
        the prior seed does not matter."""
        drawn = {} if hypotheses == "mean" else {"hypotheses": hypotheses}
        if model_samples:
            drawn["model_samples"] = True
        if solver.path_mean and solver.num_evaluations > 1:  # one Euler step: the same output either way
            drawn["path_mean"] = True
        return {"steps": int(solver.steps), "solver": solver.method, "num_samples": int(num_samples), **drawn}

    @property
    def segmenter(self) -> FlowSegmenter:
        """The per-patch sampler (unwrapping torch.compile)."""
        return getattr(self.network, "_orig_mod", self.network)

    def make_segmenter(self, field: nn.Module, plans_manager: PlansManager, dataset_json: dict) -> FlowSegmenter:
        """Wrap a vector field in the sampler configured by the plans' flow block and this predictor's options."""
        config = FlowMatchingConfig.from_plans(plans_manager.plans)
        label_manager = plans_manager.get_label_manager(dataset_json)
        if self.model_samples and not dropout_layers(field):
            raise UserError("--mc_dropout needs a model trained with dropout (flow_matching.network.dropout > 0, "
                            "e.g. -tr MedFlowSegTrainer_dropout); this one has no dropout layers")
        return FlowSegmenter(field, label_manager.num_segmentation_heads, config.parameterization,
                             solver=config.solver_config(self.steps, self.solver, self.path_mean),
                             seed=config.prior_seed if self.seed is None else self.seed,
                             num_samples=self.num_samples, logit_scale=config.logit_scale,
                             multilabel=label_manager.has_regions, hypotheses=self.hypotheses,
                             model_samples=self.model_samples)

    def manual_initialization(self, network: nn.Module, plans_manager: PlansManager,
                              configuration_manager: ConfigurationManager, parameters: Optional[list],
                              dataset_json: dict, trainer_name: str,
                              inference_allowed_mirroring_axes: Optional[Sequence[int]]) -> None:
        if not isinstance(network, FlowSegmenter):
            network = self.make_segmenter(network, plans_manager, dataset_json)
        self._loaded = None
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)

    # --- one case ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _predict_one_model(self, image: Tensor, with_samples: bool, with_votes: bool = False) -> CasePrediction:
        """``image [C_img, *S]`` with the weights currently loaded → logits ``[C, *S]`` (+ disagreement, + the
        samples' class votes: for K = 1 the one sample's vote, from its logits)."""
        self.network = self.network.to(self.device)
        self.network.eval()
        empty_cache(self.device)
        patch_size = self.configuration_manager.patch_size
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            data, revert = pad_nd_image(image, patch_size, "constant", {"value": 0}, True, None)
            results_device = self.device if self.perform_everything_on_device else torch.device("cpu")
            kwargs = dict(slicers=nnunet_compat.sliding_window_slicers(self, data.shape[1:]),
                          num_classes=self.label_manager.num_segmentation_heads,
                          combinations=nnunet_compat.mirror_combinations(
                              self.allowed_mirroring_axes if self.use_mirroring else None),
                          gaussian=nnunet_compat.gaussian_importance_map(patch_size, results_device)
                          if self.use_gaussian else None,
                          device=self.device, with_samples=with_samples, progress=self.allow_tqdm,
                          with_votes=with_votes)
            try:
                out = stitch_patches(self.segmenter, data, results_device=results_device, **kwargs)
            except RuntimeError:
                if results_device.type == "cpu":
                    raise
                logger.warning("prediction on %s failed (out of memory?); keeping the results on the CPU",
                               self.device)
                empty_cache(self.device)
                kwargs["gaussian"] = kwargs["gaussian"].cpu() if kwargs["gaussian"] is not None else None
                out = stitch_patches(self.segmenter, data, results_device=torch.device("cpu"), **kwargs)
        spatial = tuple(revert[1:])
        disagreement = None if out.disagreement is None else out.disagreement[spatial].cpu()
        logits = out.logits[(slice(None), *spatial)]
        votes = out.votes[(slice(None), *spatial)] if out.votes is not None \
            else self.single_sample_votes(logits) if with_votes else None
        return CasePrediction(logits, disagreement, votes)

    def single_sample_votes(self, logits: Tensor) -> Tensor:
        """``[C, *S]`` votes of one member from its logits: one-hot argmax (regions: log-odds > 0), float32, CPU."""
        logits = logits.float().cpu()
        if self.segmenter.multilabel:
            return (logits > 0).float()
        return torch.nn.functional.one_hot(logits.argmax(0), logits.shape[0]).movedim(-1, 0).float()

    def predict_case(self, data: Tensor, with_disagreement: bool = False, with_mapped: bool = False
                     ) -> CasePrediction:
        """``data [C_img, *S]`` (preprocessed) → :class:`CasePrediction` on the CPU: logits averaged over the
        folds' weights (nnU-Net's fold ensemble) and, if requested, the disagreement of the members: the K samples
        of one fold, or with F folds the F·K (fold, sample) segmentations (their class votes summed over folds);
        ``with_mapped``: also the mapped logits where every fold has a top-label map (for exported probabilities).
        A packed ensemble whose calibration holds member maps predicts each member alone, mapped before the average
        (:mod:`medflowseg_nn.inference.member_calibration`); its disagreement is then over (member, sample)."""
        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))
        folds = len(self.list_of_parameters)
        calibrations = [self.fold_calibrations[i] if i < len(self.fold_calibrations) else None for i in range(folds)]
        packed = member_field(self.segmenter)
        member_maps = [c.member_maps if c is not None and packed is not None else () for c in calibrations]
        with_votes = with_disagreement and (folds > 1 or any(member_maps))
        # mapped logits only where every fold has its map (else the export uses T alone)
        with_mapped = with_mapped and all(c is not None and (c.top_label_map is not None or bool(maps))
                                          for c, maps in zip(calibrations, member_maps))
        try:
            logits, disagreement, votes, mapped, members = None, None, None, None, 0
            for params, calibration, maps in zip(self.list_of_parameters, calibrations, member_maps):
                self.load_parameters(params)
                if maps:  # each member stitched and mapped before the average (inference.member_calibration)
                    one = predict_members(lambda: self._predict_one_model(data, with_disagreement, with_votes),
                                          packed, maps)
                else:
                    one = self._predict_one_model(data, with_disagreement, with_votes)
                members += self.segmenter.num_samples * max(len(maps), 1)
                fold_logits = one.logits.to("cpu")
                if calibration is not None:
                    fold_logits = calibration.scaled(fold_logits)
                if with_mapped:
                    fold_mapped = one.mapped if maps else calibration.mapped(fold_logits)
                    mapped = fold_mapped if mapped is None else mapped + fold_mapped
                logits = fold_logits if logits is None else logits + fold_logits
                disagreement = one.disagreement
                if with_votes:
                    votes = one.votes if votes is None else votes + one.votes
            if folds > 1:
                logits /= folds
                mapped = None if mapped is None else mapped / folds
        finally:
            torch.set_num_threads(n_threads)
        if with_votes:
            disagreement = mask_votes_disagreement(votes, members).mean(0) if self.segmenter.multilabel \
                else votes_disagreement(votes, members)
        return CasePrediction(logits, disagreement, mapped=mapped)

    def predict_logits_from_preprocessed_data(self, data: Tensor) -> Tensor:
        """nnU-Net's entry point for one preprocessed case: ``[C_img, *S]`` → logits ``[C, *S]``."""
        return self.predict_case(data).logits

    def predict_sliding_window_return_logits(self, input_image: Tensor) -> Tensor:
        """nnU-Net's entry point with the loaded weights (its final validation calls it): logits ``[C, *S]``."""
        return self._predict_one_model(input_image, with_samples=False).logits

    # --- loading ----------------------------------------------------------------------------------------------
    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Sequence[Union[int, str]], str, None],
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        """Load a trained MedFlowSeg model. The network is built from the folder's ``plans.json`` (its resolved
        ``flow_matching`` block says what was trained), never through a trainer-name search."""
        for required in ("dataset.json", "plans.json"):
            if not isfile(join(model_training_output_dir, required)):
                raise UserError(f"{join(model_training_output_dir, required)} not found — is "
                                f"{model_training_output_dir} a trained model folder?")
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
            if not use_folds:
                raise UserError(f"no fold_*/{checkpoint_name} in {model_training_output_dir} — train a fold first "
                                f"(mfs_train) or pass -chk")
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
        dataset_json = load_json(join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(load_json(join(model_training_output_dir, "plans.json")))
        parameters, checkpoint = [], None
        for f in use_folds:
            f = f if f == "all" else int(f)
            path = join(model_training_output_dir, f"fold_{f}", checkpoint_name)
            if not isfile(path):
                raise UserError(f"checkpoint {path} not found — train fold {f} first or pick another -f / -chk")
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            checkpoint = checkpoint or ckpt
            parameters.append(ckpt["network_weights"])
        configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
        network = build_vector_field(
            configuration_manager, determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            FlowMatchingConfig.from_plans(plans_manager.plans))
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"))
        settings = self.sampler_settings(self.segmenter.solver, self.num_samples, self.hypotheses,
                                         self.model_samples)
        self.fold_calibrations = [
            load_calibration(join(model_training_output_dir, f"fold_{f}"), settings, os.path.basename(checkpoint_name))
            if self.use_temperature and not self.label_manager.has_regions else None for f in use_folds]
        check_member_maps(member_field(self.segmenter), self.fold_calibrations, model_training_output_dir)
        logger.info("loaded %s (%s, folds %s) with %s; calibrations %s", model_training_output_dir,
                    checkpoint["trainer_name"], list(use_folds), self.segmenter.solver,
                    [c if c is None else c.summary for c in self.fold_calibrations])
