"""Member temperatures of a packed ensemble (:mod:`medflowseg_nn.networks.member_ensemble`), fitted after training.

Each member predicts the fold's validation cases alone, with the final validation's predictor settings (sliding
window, Gaussian, the trainer's mirroring axes; one step), in nnU-Net's preprocessed geometry; its T minimises the
NLL of the voxels of the reference's foreground dilated by ``roi_dilation`` (the ROI the fold temperature uses,
:func:`medflowseg_nn.temperature.temperature_of_rows`; ignore-label voxels left out). The temperatures go into the
network's ``member_temperature`` buffer and into ``checkpoint_final.pth``, so the final validation after it and
every prediction see the tempered members' average. They are the model's whole post-hoc calibration: the trainer
fits no fold temperature / top-label map on top (no ``temperature.json``).

Measured on the 2d CPU protocol (``benchmarks/RESULTS.md`` 2026-12-06 21:xx, ``benchmarks/value_members.py``, two
seeds, test ROI ECE): one T + map on the members' plain average 0.0113 / 0.0125 (a single nnU-Net model's level);
members tempered, then averaged 0.0050 / 0.0054; a fold T + map fitted again on that average 0.0113 / 0.0125 (the
second fit on the same 32 validation cases sharpens, T 0.87, and the test cases disagree); each member T + map,
then averaged, 0.0016 / 0.0013 (needs per-member maps in the predictor, not built).
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
from medflowseg_nn.recalibration import cap_rows
from medflowseg_nn.temperature import temperature_of_rows

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


def member_predictor(trainer: Any, member: torch.nn.Module):
    """A :class:`MedFlowSegPredictor` of one member, with nnU-Net's final-validation settings."""
    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    predictor = MedFlowSegPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=True, device=trainer.device, verbose=False,
                                    allow_tqdm=False)
    predictor.manual_initialization(member, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def fit_member_temperatures(trainer: Any, roi_dilation: int = 3) -> Optional[list[float]]:
    """Fit, set and return the member temperatures of ``trainer``'s packed ensemble (module docstring); ``None``
    (nothing done) for any other network."""
    field = unwrap(trainer.network)
    if not isinstance(field, MemberEnsembleField):
        return None
    modes = [member.training for member in field.members]  # the predictors put the members in eval mode
    rows: list[list[np.ndarray]] = [[] for _ in field.members]
    labels: list[np.ndarray] = []
    predictors = [member_predictor(trainer, member) for member in field.members]
    for _, data, reference in validation_cases(trainer):
        for m, predictor in enumerate(predictors):
            logits = predictor.predict_sliding_window_return_logits(data).float().cpu()
            p, y = roi_rows(torch.softmax(logits, 0).numpy(), reference, roi_dilation,
                            trainer.label_manager.ignore_label)
            rows[m].append(p)
        labels.append(y)
    y_all = np.concatenate(labels)  # every member on the same voxels: the same seeded subsample beyond 2 million
    temperatures = [temperature_of_rows(*cap_rows(np.concatenate(r), y_all)) for r in rows]
    field.set_member_temperatures(temperatures)
    for member, mode in zip(field.members, modes):
        member.train(mode)
    logger.info("member temperatures %s fitted on %d ROI voxels of the fold's validation cases",
                ", ".join(f"{t:.3f}" for t in temperatures), len(y_all))
    return temperatures


def calibrate_members(trainer: Any) -> Optional[list[float]]:
    """:func:`fit_member_temperatures`, then (rank 0) the weights with them into the fold's
    ``checkpoint_final.pth`` when it exists; ``None`` for a network that is not a packed ensemble."""
    temperatures = fit_member_temperatures(trainer)
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    if temperatures is not None and trainer.local_rank == 0 and os.path.isfile(final):
        store_network_weights(final, trainer.network)
    return temperatures


def store_network_weights(checkpoint: str, network: torch.nn.Module) -> None:
    """Replace the network weights saved in ``checkpoint`` by ``network``'s state dict (written atomically; the
    rest of the checkpoint — epoch, optimiser, logs — as it was)."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["network_weights"] = unwrap(network).state_dict()
    tmp = f"{checkpoint}.tmp"
    torch.save(content, tmp)
    os.replace(tmp, checkpoint)
