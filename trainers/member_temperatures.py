"""Member calibration of a packed ensemble (:mod:`medflowseg_nn.networks.member_ensemble`), fitted after training.

Each member predicts the fold's validation cases alone, with the final validation's predictor settings (sliding
window, Gaussian, the trainer's mirroring axes; one step), in nnU-Net's preprocessed geometry; its T minimises the
NLL of the voxels of the reference's foreground dilated by ``roi_dilation`` (the ROI the fold temperature uses,
:func:`medflowseg_nn.temperature.temperature_of_rows`; ignore-label voxels left out), and its top-label map is
fitted on the same voxels after T (:func:`medflowseg_nn.temperature.calibration_of_rows`); beyond 2 million ROI
voxels on a seeded uniform sample of them, drawn while the cases arrive
(:class:`medflowseg_nn.recalibration.RowSample`), so memory does not grow with the validation set. The
temperatures go into the network's ``member_temperature`` buffer and into ``checkpoint_final.pth``, so the final
validation after it and every prediction see the tempered members' average; the maps go into the fold's
``temperature.json`` (``member_maps``, T = 1, for the final validation's sampler settings), which ``mfs_predict``
applies to each member before the average (:mod:`medflowseg_nn.inference.member_calibration`). No fold T / map
of the average is fitted.

Measured on the 2d CPU protocol (``benchmarks/RESULTS.md`` 2026-12-06 20:17, ``benchmarks/value_members.py``, two
seeds, test ROI ECE): one T + map on the members' plain average 0.0113 / 0.0125 (a single nnU-Net model's level);
members tempered, then averaged 0.0050 / 0.0054; a fold T + map fitted again on that average 0.0113 / 0.0125 (the
second fit on the same 32 validation cases sharpens, T 0.87, and the test cases disagree); each member T + map,
then averaged, 0.0016 / 0.0013.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np
import torch

from medflowseg_nn.calibration_folder import roi_rows
from medflowseg_nn.networks.member_ensemble import MemberEnsembleField
from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.recalibration import RowSample
from medflowseg_nn.temperature import FoldCalibration, calibration_of_rows, save_temperature

logger = logging.getLogger(__name__)


def validation_cases(trainer: Any):
    """``(identifier, data [C, *S] tensor, reference [*S] int64)`` of the trainer's fold validation cases,
    preprocessed, with the previous stage's one-hot segmentation stacked on for a cascade (as nnU-Net validates)."""
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    for key in dataset.identifiers:
        data, seg, seg_prev, _ = dataset.load_case(key)
        data = np.asarray(data[:])
        if trainer.is_cascaded:
            data = np.vstack((data, convert_labelmap_to_one_hot(np.asarray(seg_prev[:]),
                                                                trainer.label_manager.foreground_labels,
                                                                output_dtype=data.dtype)))
        yield key, torch.from_numpy(data), np.asarray(seg[:])[0].astype(np.int64)


def member_predictor(trainer: Any, member: torch.nn.Module, use_mirroring: bool = True):
    """A :class:`MedFlowSegPredictor` of one member, with nnU-Net's final-validation settings (``use_mirroring``
    False: without its mirroring, e.g. for a benchmark that predicts without TTA)."""
    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    predictor = MedFlowSegPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=True, device=trainer.device, verbose=False,
                                    allow_tqdm=False)
    predictor.manual_initialization(member, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def fit_member_calibrations(trainer: Any, roi_dilation: int = 3,
                            use_mirroring: bool = True) -> Optional[list[FoldCalibration]]:
    """Fit each member's T and top-label map of ``trainer``'s packed ensemble, set the temperatures in the network
    and return both (module docstring; ``use_mirroring`` as :func:`member_predictor`); ``None`` (nothing done) for
    any other network."""
    field = unwrap(trainer.network)
    if not isinstance(field, MemberEnsembleField):
        return None
    modes = [member.training for member in field.members]  # the predictors put the members in eval mode
    sample = RowSample(len(field.members))  # every member on the same voxels, at most 2 million (seeded)
    predictors = [member_predictor(trainer, member, use_mirroring) for member in field.members]
    for _, data, reference in validation_cases(trainer):
        rows = []
        for predictor in predictors:
            logits = predictor.predict_sliding_window_return_logits(data).float().cpu()
            p, y = roi_rows(torch.softmax(logits, 0).numpy(), reference, roi_dilation,
                            trainer.label_manager.ignore_label)
            rows.append(p)
        sample.add(rows, y)
    member_rows, y_all = sample.result()
    calibrations = [calibration_of_rows(r, y_all) for r in member_rows]
    field.set_member_temperatures([c.temperature for c in calibrations])
    for member, mode in zip(field.members, modes):
        member.train(mode)
    logger.info("member temperatures %s and top-label maps fitted on %d of the %d ROI voxels of the fold's validation "
                "cases", ", ".join(f"{c.temperature:.3f}" for c in calibrations), len(y_all), sample.seen)
    return calibrations


def calibrate_members(trainer: Any, roi_dilation: int = 3) -> Optional[list[FoldCalibration]]:
    """:func:`fit_member_calibrations`, then (rank 0) the weights with the temperatures into the checkpoint file the
    network's weights are (``trainer.weights_file``: ``checkpoint_final.pth`` after training, ``checkpoint_best.pth``
    with ``--val_best``) and the member maps, naming that file, into the fold's ``temperature.json``; ``None`` for
    a network that is not a packed ensemble. Under DDP (every rank calls it) rank 0 fits and broadcasts the result
    (``torch.distributed.broadcast_object_list``), so no rank repeats the member predictions and all hold the same
    temperatures for the final validation."""
    field = unwrap(trainer.network)
    if not isinstance(field, MemberEnsembleField):
        return None
    calibrations = fit_member_calibrations(trainer, roi_dilation) if trainer.local_rank == 0 else None
    if trainer.is_ddp:
        box = [calibrations]
        torch.distributed.broadcast_object_list(box, src=0)
        calibrations = box[0]
        field.set_member_temperatures([c.temperature for c in calibrations])
    if trainer.local_rank != 0:
        return calibrations
    weights = trainer.weights_file  # the checkpoint these weights are (trainers.checkpoint_files), None: unknown
    if weights is not None and os.path.isfile(os.path.join(trainer.output_folder, weights)):
        store_network_weights(os.path.join(trainer.output_folder, weights), trainer.network)
    else:
        logger.warning("the network's weights are no checkpoint file of %s: the member temperatures are in no "
                       "checkpoint", trainer.output_folder)
    _, val_keys = trainer.do_split()
    sampler = trainer.final_validation_sampler()
    save_temperature(trainer.output_folder, 1.0, {
        "cases": sorted(val_keys), "roi_dilation": roi_dilation, "objective": "NLL in the reference ROI, per member",
        "member_temperatures": [c.temperature for c in calibrations], "sampler": sampler,
        "top_label_map": "isotonic, per member after its T, in the reference ROI"},
        member_maps=[c.top_label_map for c in calibrations], checkpoint=weights)
    return calibrations


def store_network_weights(checkpoint: str, network: torch.nn.Module) -> None:
    """Replace the network weights saved in ``checkpoint`` by ``network``'s state dict (written atomically; the
    rest of the checkpoint — epoch, optimiser, logs — as it was)."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["network_weights"] = unwrap(network).state_dict()
    tmp = f"{checkpoint}.tmp"
    torch.save(content, tmp)
    os.replace(tmp, checkpoint)
