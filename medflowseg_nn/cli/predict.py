"""``mfs_predict -i INPUT -o OUTPUT -d DATASET -c CONFIG -f FOLD``: segment images with a trained model.

Each sliding-window patch is segmented by integrating the learned flow from a seeded prior: one network
evaluation by default (``--steps 1``), Euler or Heun for more. ``--num_samples K`` grows K segmentations from
the priors seeded ``--seed``, ``--seed + 1``, ... in one batched network call per patch and averages their
probabilities; the same seed gives bit-identical outputs on the same machine. Preprocessing, Gaussian patch
weighting, mirroring, resampling and export are nnU-Net's.

Outputs (in -o unless noted): ``CASE<ending>`` segmentation; ``--save_probabilities``: nnU-Net's ``CASE.npz``
(``probabilities`` [C, *S], summing to 1 per voxel) + ``CASE.pkl``; ``--save_uncertainty [DIR]`` (default
``-o/uncertainty``): ``CASE_entropy.nii.gz`` = predictive entropy (nats) of the averaged probabilities and
``CASE_disagreement.nii.gz`` = fraction of the K samples' pairs whose labels differ (0 for K = 1), both float32
with the input image's geometry; ``--overlay_png DIR``: ``CASE.png`` middle slices with labels (and entropy).

Robust folder runs: every case is checked first (readable, channel count); a bad case is skipped and reported
at the end (one line naming the file and the problem, exit code 2) while all others are written. Files are
written to ``.mfs_partial/`` and moved into place, so a killed run never leaves a truncated output, and a rerun
skips cases whose outputs all exist (``--overwrite`` redoes them).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import torch

from medflowseg_nn.cli._common import UserError, cli_errors, dataset_name, pick_device, require_env, setup_logging
from medflowseg_nn.cli.train import DEFAULT_PLANS, DEFAULT_TRAINER

logger = logging.getLogger(__name__)


def model_folder_from_args(dataset: str, configuration: str, trainer: str = DEFAULT_TRAINER,
                           plans: str = DEFAULT_PLANS) -> str:
    results = require_env("nnUNet_results")
    folder = os.path.join(results, dataset_name(dataset), f"{trainer}__{plans}__{configuration}")
    if not os.path.isdir(folder):
        raise UserError(f"no trained model at {folder} — train it with `mfs_train {dataset} {configuration} 0"
                        f"{'' if trainer == DEFAULT_TRAINER else ' -tr ' + trainer}` or pass -m MODEL_FOLDER")
    return folder


def list_cases(input_folder: str, file_ending: str) -> dict[str, list[str]]:
    """``{case: [channel files]}`` of ``input_folder`` (nnU-Net naming ``CASE_XXXX{file_ending}``)."""
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    if not os.path.isdir(input_folder):
        raise UserError(f"input folder {input_folder} does not exist")
    files = sorted(f for f in os.listdir(input_folder) if f.endswith(file_ending) and not f.startswith("."))
    cases = {str(c): create_paths_fn(input_folder, files, file_ending, str(c))
             for c in get_identifiers_from_splitted_dataset_folder(input_folder, file_ending)}
    cases = {c: f for c, f in cases.items() if f}
    if not cases:
        raise UserError(f"no images in {input_folder} match CASE_0000{file_ending} (nnU-Net naming: one file per "
                        f"channel with a _XXXX suffix, ending {file_ending})")
    return cases


def check_input_folder(input_folder: str, file_ending: str, num_channels: int) -> list[str]:
    """Case identifiers in ``input_folder`` (files ``CASE_XXXX{file_ending}``), with clear errors."""
    return list(list_cases(input_folder, file_ending))


def validate_case(case: str, files: Sequence[str], file_ending: str, num_channels: int) -> list[str]:
    """Problems (one line each, naming the file) that would make nnU-Net fail on this case; [] if it is usable.

    Reads every file (NIfTI voxels with nibabel, which, unlike SimpleITK, raises on truncated files) and checks
    that the channels add up to the model's ``num_channels`` (a 4D file counts its 4th axis)."""
    from medflowseg_nn.dataset_checks import NATURAL_IMAGE_ENDINGS, _check_case

    natural = file_ending.lower() in NATURAL_IMAGE_ENDINGS
    problems, _ = _check_case((case, list(files), None, natural, None, num_channels))
    if natural or problems:
        return problems
    import SimpleITK as sitk

    found = 0
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        reader.ReadImageInformation()
        found += reader.GetSize()[3] if reader.GetDimension() == 4 else 1
    if found != num_channels:
        names = ", ".join(os.path.basename(f) for f in files)
        expected = ", ".join(f"{case}_{c:04d}{file_ending}" for c in range(num_channels))
        problems.append(f"{names}: {found} channel(s) but the model expects {num_channels} ({expected}) — wrong "
                        "channel count; provide exactly the model's channel files")
    return problems


def predict(input_folder: str, output_folder: str, model_folder: str,
            folds: Optional[Sequence[Union[int, str]]] = None, checkpoint: str = "checkpoint_final.pth",
            step_size: float = 0.5, disable_tta: bool = False, device: torch.device = torch.device("cpu"),
            steps: Optional[int] = None, solver: Optional[str] = None, seed: Optional[int] = None,
            num_samples: int = 1, save_probabilities: bool = False, overwrite: bool = False,
            num_processes_preprocessing: int = 2, num_processes_export: int = 2, verbose: bool = False,
            uncertainty_folder: Optional[str] = None, overlay_folder: Optional[str] = None) -> dict[str, str]:
    """Predict every case of ``input_folder`` into ``output_folder`` (nnU-Net file naming and geometry).

    Cases whose outputs all exist are skipped unless ``overwrite``. Returns ``{case: problem}`` for the cases
    that could not be predicted (invalid input or failure); every other case is written."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    from medflowseg_nn.predictor import PARTIAL_DIR, CaseJob, ExportOptions, MedFlowSegPredictor, case_outputs

    predictor = MedFlowSegPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=verbose, allow_tqdm=True, steps=steps, solver=solver, seed=seed,
                                    num_samples=num_samples)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    dataset_json = predictor.dataset_json
    ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    options = ExportOptions(save_probabilities, uncertainty_folder, overlay_folder)
    if uncertainty_folder and num_samples < 2:
        logger.warning("--num_samples 1: the disagreement maps are all 0 (they need K >= 2 samples)")
    jobs = [CaseJob(c, tuple(f), os.path.join(output_folder, c)) for c, f in list_cases(input_folder, ending).items()]
    todo = [j for j in jobs if overwrite or not all(map(os.path.isfile, case_outputs(j, ending, options).values()))]
    if len(todo) < len(jobs):
        logger.info("skipping %d case(s) whose outputs exist in %s (--overwrite redoes them)", len(jobs) - len(todo),
                    output_folder)
    with ThreadPoolExecutor(max(1, num_processes_preprocessing)) as pool:
        checks = list(pool.map(lambda j: validate_case(j.case, j.files, ending, num_channels), todo))
    failures = {j.case: "; ".join(p) for j, p in zip(todo, checks) if p}
    todo = [j for j in todo if j.case not in failures]
    for folder in filter(None, (output_folder, uncertainty_folder, overlay_folder)):
        os.makedirs(folder, exist_ok=True)
    save_json(dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)  # as nnU-Net does
    save_json(predictor.plans_manager.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    logger.info("predicting %d case(s) from %s with %s, %d sample(s), seed %d", len(todo), input_folder,
                predictor.network.solver, num_samples, predictor.network.seed)
    if todo:
        failures.update(predictor.predict_cases(todo, options, num_processes_preprocessing, num_processes_export))
    for folder in filter(None, (output_folder, uncertainty_folder, overlay_folder)):
        partial = os.path.join(folder, PARTIAL_DIR)
        if os.path.isdir(partial) and not os.listdir(partial):
            os.rmdir(partial)
    return dict(sorted(failures.items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="input folder (nnU-Net naming: CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-m", default=None, help="trained model folder (instead of -d/-c/-tr/-p)")
    p.add_argument("-d", default=None, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-tr", default=DEFAULT_TRAINER)
    p.add_argument("-p", default=DEFAULT_PLANS)
    p.add_argument("-f", nargs="+", default=None, help="folds (default: all found)")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-step_size", type=float, default=0.5)
    p.add_argument("--disable_tta", action="store_true", help="no mirroring")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: plans, 1)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="prior seed (default: plans, 0); sample k uses seed + k; same seed = identical output")
    p.add_argument("--num_samples", type=int, default=1,
                   help="K flows per patch from K seeded priors, run as one batch, probabilities averaged")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write nnU-Net's CASE.npz ('probabilities' [C, *S], sum 1 per voxel) and CASE.pkl")
    p.add_argument("--save_uncertainty", nargs="?", const="", default=None, metavar="DIR",
                   help="write CASE_entropy.nii.gz (predictive entropy of the averaged probabilities, nats) and "
                        "CASE_disagreement.nii.gz (fraction of the K samples' pairs whose labels differ; 0 for "
                        "K=1) with the input's geometry, to DIR (default: OUTPUT/uncertainty)")
    p.add_argument("--overlay_png", default=None, metavar="DIR",
                   help="write DIR/CASE.png: middle slices with the predicted labels (and entropy, if computed)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--continue_prediction", action="store_true",
                   help="skip cases already predicted (the default; accepted for nnU-Net users)")
    p.add_argument("-npp", type=int, default=2, help="preprocessing processes (0: in this process)")
    p.add_argument("-nps", type=int, default=2, help="export processes (0: in this process)")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.m is None and args.d is None:
        raise UserError("give the model as -m MODEL_FOLDER or as -d DATASET [-c CONFIG -tr TRAINER -p PLANS]")
    if args.steps is not None and args.steps < 1 or args.num_samples < 1:
        raise UserError("--steps and --num_samples must be >= 1")
    if args.overwrite and args.continue_prediction:
        raise UserError("--overwrite and --continue_prediction contradict each other; pick one")
    model = args.m or model_folder_from_args(args.d, args.c, args.tr, args.p)
    if not os.path.isdir(model):
        raise UserError(f"model folder {model} does not exist")
    uncertainty = None if args.save_uncertainty is None else args.save_uncertainty or os.path.join(args.o,
                                                                                                   "uncertainty")
    failures = predict(args.i, args.o, model, args.f, args.chk, args.step_size, args.disable_tta,
                       pick_device(args.device), args.steps, args.solver, args.seed, args.num_samples,
                       args.save_probabilities, args.overwrite, args.npp, args.nps, args.verbose, uncertainty,
                       args.overlay_png)
    if failures:
        print(f"error: {len(failures)} case(s) could not be predicted (all others were written to {args.o}):",
              file=sys.stderr)
        for problem in failures.values():
            print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
