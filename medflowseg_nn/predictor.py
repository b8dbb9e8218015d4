"""MedFlowSegPredictor: nnU-Net's predictor with the flow integrated per patch.

nnU-Net's preprocessing, sliding window (Gaussian weighting), mirroring TTA, resampling and export are used as
they are; the network it calls is a :class:`FlowSegmenter` (seeded prior → label log-probabilities; K samples
are one batched network evaluation). Additions:

* ``compute_disagreement=True`` (K ≥ 2): small hooks on nnU-Net's sliding window stitch the K samples' patch
  probabilities with the same Gaussian weights; :attr:`MedFlowSegPredictor.last_disagreement` then holds the
  sample-disagreement map ``[*S]`` of the last case (preprocessed geometry; :mod:`medflowseg_nn.uncertainty`).
* :meth:`MedFlowSegPredictor.predict_cases`: a folder loop that isolates failures per case and writes outputs
  atomically (``.mfs_partial/`` + ``os.replace``, segmentation last), reusing nnU-Net's background
  preprocessing and a spawn export pool like ``predict_from_files``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_pickle
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.dataset_checks import _one_line
from medflowseg_nn.segmenter import FlowSegmenter
from medflowseg_nn.uncertainty import (SampleDisagreementMixin, predictive_entropy, revert_to_original_geometry,
                                       write_map)

logger = logging.getLogger(__name__)
PARTIAL_DIR = ".mfs_partial"  #: outputs are written here first, then moved into place


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_case` writes besides the segmentation (folders ``None`` = not written)."""

    save_probabilities: bool = False
    uncertainty_folder: Optional[str] = None
    overlay_folder: Optional[str] = None


@dataclass(frozen=True)
class CaseJob:
    case: str
    files: tuple[str, ...]
    output_truncated: str  # output folder / case id; nnU-Net appends the file ending


def case_outputs(job: CaseJob, file_ending: str, options: ExportOptions) -> dict[str, str]:
    """Final output paths of a case by kind; the segmentation ("seg") is always last."""
    out = {}
    if options.uncertainty_folder:
        for kind in ("entropy", "disagreement"):
            out[kind] = join(options.uncertainty_folder, f"{job.case}_{kind}.nii.gz")
    if options.overlay_folder:
        out["png"] = join(options.overlay_folder, f"{job.case}.png")
    if options.save_probabilities:
        out.update(npz=job.output_truncated + ".npz", pkl=job.output_truncated + ".pkl")
    out["seg"] = job.output_truncated + file_ending
    return out


def export_case(logits: np.ndarray, properties: dict, disagreement: Optional[np.ndarray], job: CaseJob,
                options: ExportOptions, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                dataset_json: dict) -> None:
    """Revert ``logits [C, *S]`` (preprocessed geometry) to the input geometry and write the case's outputs
    atomically: each file goes to ``<folder>/.mfs_partial/`` and is moved into place only when all are written."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    paths = case_outputs(job, dataset_json["file_ending"], options)
    need_probs = options.save_probabilities or options.uncertainty_folder is not None
    ret = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=need_probs)
    seg, probs = ret if need_probs else (ret, None)
    tmp = {kind: join(os.path.dirname(p), PARTIAL_DIR, os.path.basename(p)) for kind, p in paths.items()}
    try:
        for t in tmp.values():
            os.makedirs(os.path.dirname(t), exist_ok=True)
        entropy = predictive_entropy(probs) if options.uncertainty_folder else None
        if options.uncertainty_folder:
            write_map(entropy, tmp["entropy"], properties)
            dis = revert_to_original_geometry(disagreement, properties, plans_manager, configuration_manager, (0, 1))
            write_map(dis, tmp["disagreement"], properties)
        if options.overlay_folder:
            from medflowseg_nn.overlay import save_overlay_png

            image = plans_manager.image_reader_writer_class().read_images(job.files)[0][0]
            names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
            save_overlay_png(tmp["png"], image, seg, entropy, properties["spacing"], names, job.case)
        if options.save_probabilities:
            np.savez_compressed(tmp["npz"], probabilities=probs)
            save_pickle(properties, tmp["pkl"])
        plans_manager.image_reader_writer_class().write_seg(seg, tmp["seg"], properties)
        for kind, p in paths.items():  # dict order: the segmentation is moved last
            os.replace(tmp[kind], p)
    finally:
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)


class MedFlowSegPredictor(SampleDisagreementMixin, nnUNetPredictor):
    """Arguments as :class:`nnUNetPredictor`, plus the sampling options. ``None`` = the plans' default."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 steps: Optional[int] = None, solver: Optional[str] = None, seed: Optional[int] = None,
                 num_samples: int = 1, compute_disagreement: bool = False):
        super().__init__(tile_step_size, use_gaussian, use_mirroring, perform_everything_on_device, device,
                         verbose, verbose_preprocessing, allow_tqdm)
        self.steps, self.solver, self.seed, self.num_samples = steps, solver, seed, num_samples
        self.compute_disagreement = compute_disagreement
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

    # --- folder prediction ------------------------------------------------------------------------------------
    def _preprocessed(self, jobs: Sequence[CaseJob], num_processes: int,
                      failures: dict[str, str]) -> Iterator[tuple[CaseJob, dict]]:
        """Yield ``(job, {'data' [C, *S], 'data_properties'})``. nnU-Net's background preprocessing first; if it
        dies, the remaining cases are preprocessed here, one at a time, failures recorded per case."""
        remaining = {j.output_truncated: j for j in jobs}
        if num_processes > 0 and jobs:
            try:
                for item in self._internal_get_data_iterator_from_lists_of_filenames(
                        [list(j.files) for j in jobs], None, list(remaining), num_processes):
                    yield remaining.pop(item["ofile"]), item
            except RuntimeError as e:
                logger.warning("background preprocessing failed (%s); preprocessing the remaining %d case(s) in "
                               "this process", e, len(remaining))
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        for job in list(remaining.values()):
            try:
                data, _, props = preprocessor.run_case(list(job.files), None, self.plans_manager,
                                                       self.configuration_manager, self.dataset_json)
            except Exception as e:  # noqa: BLE001 - reported per case
                failures[job.case] = f"{os.path.basename(job.files[0])}: preprocessing failed ({_one_line(e)})"
                continue
            yield job, {"data": torch.from_numpy(data).float().contiguous(), "data_properties": props}

    def predict_cases(self, jobs: Sequence[CaseJob], options: ExportOptions = ExportOptions(),
                      num_processes_preprocessing: int = 2, num_processes_export: int = 2) -> dict[str, str]:
        """Predict and export every job; returns ``{case: one-line problem}`` for the cases that failed (their
        outputs are not written; all others are). ``num_processes_* = 0`` runs that stage in this process."""
        self.compute_disagreement = options.uncertainty_folder is not None
        failures: dict[str, str] = {}
        pool = multiprocessing.get_context("spawn").Pool(num_processes_export) if num_processes_export > 0 else None
        workers = list(pool._pool) if pool is not None else []
        pending: list[tuple[CaseJob, multiprocessing.pool.AsyncResult]] = []
        try:
            for job, item in self._preprocessed(jobs, num_processes_preprocessing, failures):
                logger.info("predicting %s", job.case)
                name = os.path.basename(job.files[0])
                try:
                    logits = self.predict_logits_from_preprocessed_data(item["data"]).cpu().numpy()
                except Exception as e:  # noqa: BLE001 - reported per case
                    failures[job.case] = f"{name}: prediction failed ({_one_line(e)})"
                    continue
                args = (logits, item["data_properties"], self.last_disagreement if self.compute_disagreement
                        else None, job, options, self.plans_manager, self.configuration_manager, self.dataset_json)
                if pool is None:
                    try:
                        export_case(*args)
                    except Exception as e:  # noqa: BLE001
                        failures[job.case] = f"{name}: export failed ({_one_line(e)})"
                    continue
                while all(w.is_alive() for w in workers) and \
                        sum(not r.ready() for _, r in pending) >= num_processes_export + 2:
                    time.sleep(0.05)
                pending.append((job, pool.apply_async(export_case, args)))
            for job, result in pending:
                while not result.ready() and all(w.is_alive() for w in workers):
                    result.wait(0.1)
                try:
                    if not result.ready():
                        raise RuntimeError("export worker died (out of memory?) — rerun with -nps 0 or fewer")
                    result.get()
                except Exception as e:  # noqa: BLE001 - reported per case
                    failures[job.case] = f"{os.path.basename(job.files[0])}: export failed ({_one_line(e)})"
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        return failures

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
