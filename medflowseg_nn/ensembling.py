"""Ensembling of prediction folders (folds, configurations, several ``--seed`` / ``--steps`` runs of one model).

Every member folder holds, per case, nnU-Net's ``CASE.npz`` (``probabilities`` [C, *S], the layout the
segmentation is written in) and ``CASE.pkl`` (the reader's properties), plus the ``dataset.json`` and
``plans.json`` that ``mfs_predict`` (or nnU-Net's predictor) writes. For each case present in every member the
ensemble is what nnU-Net's ``nnunetv2.ensembling.ensemble.merge_files`` computes: the mean of the members'
probabilities (float32, accumulated in member order exactly like ``average_probabilities``), the label
manager's ``convert_probabilities_to_segmentation``, written with the plans' image writer and the first member's
properties.

Uncertainty (only where every member has ``uncertainty/CASE_entropy.nii.gz`` and ``CASE_disagreement.nii.gz``,
i.e. was run with ``--save_uncertainty``), written to ``OUT/uncertainty`` with the input image's geometry:

* ``CASE_entropy.nii.gz``: predictive entropy -Σ_c p̄_c log p̄_c (nats) of the *ensemble's* averaged
  probabilities (those in ``OUT/CASE.npz``);
* ``CASE_disagreement.nii.gz``: **member disagreement**, the fraction of the M(M-1)/2 member pairs whose
  segmentations (argmax of each member's own averaged probabilities) differ at the voxel (0 … 1). It says how
  much the ensemble's answer depends on which member (fold, seed, step count) is asked; the members' own
  K-sample disagreement maps are not mixed into it.

Why not nnU-Net's ``ensemble_folders`` itself: it asserts (no actionable message) on folders with different case
lists, does not check that the members' arrays have the same shape, reads every member file but keeps only the
sum (the member labels are needed for the disagreement map), and writes no ``plans.json`` into the output, which
``mfs_determine_postprocessing`` / a further ensemble need. The computation per case is the same.

May be imported by the CLIs and the benchmarks.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import zipfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, save_json

from medflowseg_nn.errors import UserError
from medflowseg_nn.inference.export import CaseArrays, remove_empty_partial_dirs, write_case
from medflowseg_nn.inference.runner import UNCERTAINTY_SUBFOLDER, CaseJob, ExportOptions, case_outputs
from medflowseg_nn.inference.uncertainty import pairwise_disagreement, predictive_entropy

logger = logging.getLogger(__name__)

UNCERTAINTY_KINDS = ("entropy", "disagreement")


@dataclass(frozen=True)
class EnsembleCase:
    """One case to merge: the members' ``.npz`` files (member order) and the output paths by kind."""

    case: str
    member_files: tuple[str, ...]
    outputs: dict[str, str]


def npz_shape(path: str) -> tuple[int, ...]:
    """Shape of ``probabilities`` in an ``.npz`` from its header only (nothing is decompressed beyond it)."""
    try:
        with zipfile.ZipFile(path) as z, z.open("probabilities.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path} is not an .npz with a 'probabilities' array ({type(e).__name__}) — rewrite it "
                        "with mfs_predict --save_probabilities") from e
    return tuple(int(s) for s in shape)


def member_json(folder: str, name: str) -> dict:
    """``folder/name`` (``dataset.json`` / ``plans.json``), with advice when missing."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing — prediction folders get it from mfs_predict (or nnUNetv2_predict); "
                        f"copy it from the model folder")
    return load_json(path)


def output_paths(folder: str, case: str, file_ending: str, with_uncertainty: bool = False,
                 save_probabilities: bool = False) -> dict[str, str]:
    """A case's files in a prediction folder, laid out as ``mfs_predict`` writes them (:func:`case_outputs`)."""
    options = ExportOptions(save_probabilities=save_probabilities,
                            uncertainty_folder=os.path.join(folder, UNCERTAINTY_SUBFOLDER) if with_uncertainty
                            else None)
    return case_outputs(CaseJob(case, (), os.path.join(folder, case)), file_ending, options)


def has_uncertainty(folder: str, case: str, file_ending: str) -> bool:
    paths = output_paths(folder, case, file_ending, with_uncertainty=True)
    return all(os.path.isfile(paths[k]) for k in UNCERTAINTY_KINDS)


def plan_ensemble(input_folders: Sequence[str], output_folder: str,
                  save_probabilities: bool = False) -> tuple[list[EnsembleCase], dict, dict]:
    """Check the members and list the cases to merge → ``(cases, dataset_json, plans)`` (the first member's).

    Raises :class:`UserError` for fewer than 2 folders, a missing folder / json / ``.pkl``, different label
    definitions, no common case or different array shapes. Cases missing from some member are skipped (logged)."""
    input_folders = [os.fspath(f) for f in input_folders]
    output_folder = os.fspath(output_folder)
    if len(input_folders) < 2:
        raise UserError(f"give at least 2 prediction folders to ensemble (got {len(input_folders)})")
    for folder in input_folders:
        if not os.path.isdir(folder):
            raise UserError(f"prediction folder {folder} does not exist")
    if os.path.abspath(output_folder) in {os.path.abspath(f) for f in input_folders}:
        raise UserError(f"the output folder {output_folder} is one of the inputs — pick a new folder")
    dataset_json = member_json(input_folders[0], "dataset.json")
    plans = member_json(input_folders[0], "plans.json")
    for folder in input_folders[1:]:
        other = member_json(folder, "dataset.json")
        if other.get("labels") != dataset_json.get("labels"):
            raise UserError(f"{folder}/dataset.json defines other labels than {input_folders[0]}/dataset.json — "
                            "only predictions of the same label set can be ensembled")
    per_folder = [{f[:-4] for f in os.listdir(d) if f.endswith(".npz")} for d in input_folders]
    common = sorted(set.intersection(*per_folder))
    if not common:
        raise UserError(f"no case has a .npz in every input folder ({', '.join(input_folders)}) — predict with "
                        "mfs_predict --save_probabilities (nnU-Net: --save_probabilities / --npz)")
    skipped = sorted(set.union(*per_folder) - set(common))
    if skipped:
        logger.warning("skipping %d case(s) not in every input folder: %s", len(skipped), ", ".join(skipped[:10]))
    ending = dataset_json["file_ending"]
    with_uncertainty = all(has_uncertainty(d, c, ending) for d in input_folders for c in common)
    cases = []
    for case in common:
        files = tuple(os.path.join(d, case + ".npz") for d in input_folders)
        for f in files:
            if not os.path.isfile(f[:-4] + ".pkl"):
                raise UserError(f"{f[:-4]}.pkl is missing (the case's image properties, written next to the .npz "
                                "by mfs_predict --save_probabilities) — rerun that prediction")
        shapes = [npz_shape(f) for f in files]
        if len(set(shapes)) > 1:
            raise UserError(f"case {case}: the members' probabilities differ in shape ("
                            f"{', '.join(f'{f}: {s}' for f, s in zip(files, shapes))}) — ensemble predictions of "
                            "the same images and label set only")
        cases.append(EnsembleCase(case, files, output_paths(output_folder, case, ending, with_uncertainty,
                                                            save_probabilities)))
    return cases, dataset_json, plans


def member_disagreement(labels: np.ndarray) -> np.ndarray:
    """``labels [M, *S]`` (integer segmentations of M members) → fraction of member pairs that differ ``[*S]``."""
    t = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
    return pairwise_disagreement(t, int(t.max()) + 1).numpy().astype(np.float32)


def merge_case(job: EnsembleCase, plans: dict, dataset_json: dict) -> None:
    """Average one case's members and write its outputs atomically (top level: runs in a spawn pool).

    Probabilities ``[C, *S]`` are summed in float32 in member order and divided by M, as nnU-Net's
    ``average_probabilities`` does, so the result is identical to it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    label_manager = plans_manager.get_label_manager(dataset_json)
    need_members = "disagreement" in job.outputs
    total, member_labels = None, []
    for f in job.member_files:
        p = np.load(f)["probabilities"]
        if need_members:
            member_labels.append(label_manager.convert_probabilities_to_segmentation(p))
        if total is None:
            total = p.astype(np.float32) if p.dtype != np.float32 else p
        else:
            total += p
    probabilities = total
    probabilities /= len(job.member_files)
    properties = load_pickle(job.member_files[0][:-4] + ".pkl")
    arrays = CaseArrays(
        segmentation=label_manager.convert_probabilities_to_segmentation(probabilities),
        probabilities=probabilities,
        entropy=predictive_entropy(probabilities) if "entropy" in job.outputs else None,
        disagreement=member_disagreement(np.stack(member_labels)) if need_members else None)
    write_case(arrays, job.outputs, properties, plans_manager.image_reader_writer_class().write_seg)


def ensemble_folders(input_folders: Sequence[str], output_folder: str, save_probabilities: bool = False,
                     num_processes: int = 2, overwrite: bool = True) -> list[str]:
    """Ensemble ``input_folders`` into ``output_folder`` (see the module docstring); returns the cases written.

    Also writes ``dataset.json`` and ``plans.json`` (the first member's) into ``output_folder``.
    ``num_processes = 0`` merges in this process; ``overwrite = False`` keeps cases already written."""
    cases, dataset_json, plans = plan_ensemble(input_folders, output_folder, save_probabilities)
    output_folder = os.fspath(output_folder)
    if not overwrite:
        cases = [c for c in cases if not all(map(os.path.isfile, c.outputs.values()))]
    os.makedirs(output_folder, exist_ok=True)
    if any("entropy" in c.outputs for c in cases):
        os.makedirs(os.path.join(output_folder, UNCERTAINTY_SUBFOLDER), exist_ok=True)
    else:
        logger.info("not every member has uncertainty maps (mfs_predict --save_uncertainty): none are written")
    save_json(dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
    save_json(plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    logger.info("ensembling %d case(s) of %d folders into %s", len(cases), len(input_folders), output_folder)
    args = [(c, plans, dataset_json) for c in cases]
    if num_processes <= 0 or len(cases) <= 1:
        for a in args:
            merge_case(*a)
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(cases))) as pool:
            pool.starmap(merge_case, args)
    remove_empty_partial_dirs((output_folder, os.path.join(output_folder, UNCERTAINTY_SUBFOLDER)))
    return [c.case for c in cases]

