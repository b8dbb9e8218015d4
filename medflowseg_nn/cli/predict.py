"""``mfs_predict -i INPUT -o OUTPUT -d DATASET -c CONFIG -f FOLD``: segment images with a trained model.

Each sliding-window patch is segmented by integrating the learned flow from a seeded prior: one network
evaluation by default (``--steps 1``), Euler or Heun for more. Everything else — preprocessing, Gaussian
patch weighting, mirroring, resampling, export — is nnU-Net's.
"""
from __future__ import annotations

import argparse
import logging
import os
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


def check_input_folder(input_folder: str, file_ending: str, num_channels: int) -> list[str]:
    """Case identifiers in ``input_folder`` (files ``CASE_XXXX{file_ending}``), with clear errors."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    if not os.path.isdir(input_folder):
        raise UserError(f"input folder {input_folder} does not exist")
    lists = create_lists_from_splitted_dataset_folder(input_folder, file_ending)
    if not lists:
        raise UserError(f"no images in {input_folder} match CASE_0000{file_ending} (nnU-Net naming: one file per "
                        f"channel with a _XXXX suffix, ending {file_ending})")
    return [os.path.basename(files[0])[: -len(file_ending) - 5] for files in lists]


def predict(input_folder: str, output_folder: str, model_folder: str,
            folds: Optional[Sequence[Union[int, str]]] = None, checkpoint: str = "checkpoint_final.pth",
            step_size: float = 0.5, disable_tta: bool = False, device: torch.device = torch.device("cpu"),
            steps: Optional[int] = None, solver: Optional[str] = None, seed: Optional[int] = None,
            num_samples: int = 1, save_probabilities: bool = False, overwrite: bool = True,
            num_processes_preprocessing: int = 2, num_processes_export: int = 2, verbose: bool = False) -> None:
    """Predict every case of ``input_folder`` into ``output_folder`` (nnU-Net file naming and geometry)."""
    from medflowseg_nn.predictor import MedFlowSegPredictor

    predictor = MedFlowSegPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=verbose, allow_tqdm=True, steps=steps, solver=solver, seed=seed,
                                    num_samples=num_samples)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    num_channels = len(predictor.dataset_json.get("channel_names", predictor.dataset_json.get("modality", {})))
    cases = check_input_folder(input_folder, predictor.dataset_json["file_ending"], num_channels)
    logger.info("predicting %d case(s) from %s with %s", len(cases), input_folder, predictor.network.solver)
    os.makedirs(output_folder, exist_ok=True)
    predictor.predict_from_files(input_folder, output_folder, save_probabilities=save_probabilities,
                                 overwrite=overwrite, num_processes_preprocessing=num_processes_preprocessing,
                                 num_processes_segmentation_export=num_processes_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_predict", description=__doc__)
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
    p.add_argument("--seed", type=int, default=None, help="prior seed (default: plans, 0)")
    p.add_argument("--num_samples", type=int, default=1, help="flows per patch, averaged")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases already in -o")
    p.add_argument("-npp", type=int, default=2, help="preprocessing processes")
    p.add_argument("-nps", type=int, default=2, help="export processes")
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
    model = args.m or model_folder_from_args(args.d, args.c, args.tr, args.p)
    if not os.path.isdir(model):
        raise UserError(f"model folder {model} does not exist")
    predict(args.i, args.o, model, args.f, args.chk, args.step_size, args.disable_tta, pick_device(args.device),
            args.steps, args.solver, args.seed, args.num_samples, args.save_probabilities,
            not args.continue_prediction, args.npp, args.nps, args.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
