"""``mfs_predict -i INPUT -o OUTPUT -d DATASET -c CONFIG -f FOLD``: segment images with a trained model.

Each sliding-window patch is segmented by integrating the learned flow from a seeded prior: one network
evaluation by default (``--steps 1``), Euler or Heun for more. ``--num_samples K`` grows K segmentations from
the priors seeded ``--seed``, ``--seed + 1``, ... (one batched network call per patch on a GPU, one call per
sample on CPU, see :class:`~medflowseg_nn.inference.sampler.FlowSegmenter`) and averages their
probabilities; the same seed gives bit-identical outputs on the same machine. Preprocessing, Gaussian patch
weighting, mirroring, resampling and export are nnU-Net's.

Outputs (in -o unless noted): ``CASE<ending>`` segmentation; ``--save_probabilities``: nnU-Net's ``CASE.npz``
(``probabilities`` [C, *S], summing to 1 per voxel) + ``CASE.pkl``; ``--save_uncertainty [DIR]`` (default
``-o/uncertainty``): ``CASE_entropy.nii.gz`` = predictive entropy (nats) of the averaged probabilities and
``CASE_disagreement.nii.gz`` = fraction of the K samples' pairs whose labels differ (0 for K = 1), both float32
with the input image's geometry; ``--overlay_png DIR``: ``CASE.png`` middle slices with labels (and entropy).

Cascade (nnU-Net's): predict ``-c 3d_lowres`` into DIR first, then ``-c 3d_cascade_fullres
-prev_stage_predictions DIR``; the low-resolution segmentation enters as one-hot input channels.

Robust folder runs: every case is checked first (readable, channel count); a bad case is skipped and reported
at the end (one line naming the file and the problem, exit code 2) while all others are written. Files are
written to ``.mfs_partial/`` and moved into place, so a killed run never leaves a truncated output, and a rerun
skips cases whose outputs all exist (``--overwrite`` redoes them).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, dataset_name, pick_device, require_env, setup_logging
from medflowseg_nn.cli.train import DEFAULT_PLANS, DEFAULT_TRAINER
from medflowseg_nn.cpu_allocator import tune_cpu_allocator
from medflowseg_nn.errors import UserError
from medflowseg_nn.inference.sampler import HYPOTHESES



def model_folder_from_args(dataset: str, configuration: str, trainer: str = DEFAULT_TRAINER,
                           plans: str = DEFAULT_PLANS) -> str:
    results = require_env("nnUNet_results")
    folder = os.path.join(results, dataset_name(dataset), f"{trainer}__{plans}__{configuration}")
    if not os.path.isdir(folder):
        raise UserError(f"no trained model at {folder} — train it with `mfs_train {dataset} {configuration} 0"
                        f"{'' if trainer == DEFAULT_TRAINER else ' -tr ' + trainer}` or pass -m MODEL_FOLDER")
    return folder


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
    p.add_argument("-prev_stage_predictions", default=None, metavar="DIR",
                   help="cascade (-c 3d_cascade_fullres): folder with the previous stage's (3d_lowres) "
                        "segmentations CASE<ending> of the input cases")
    p.add_argument("-step_size", type=float, default=0.5)
    p.add_argument("--disable_tta", action="store_true", help="no mirroring")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: plans, 1)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="prior seed (default: plans, 0); sample k uses seed + k; same seed = identical output")
    p.add_argument("--num_samples", type=int, default=1,
                   help="K flows per patch from K seeded priors, probabilities averaged")
    p.add_argument("--hypotheses", choices=HYPOTHESES, default="mean",
                   help="with --steps >= 2: each step before the last moves towards the estimate ('mean') or towards a "
                        "segmentation drawn from it, per voxel ('voxel') or one level set per sample ('level'), so "
                        "that the K samples differ where the model is unsure")
    p.add_argument("--path_mean", action="store_const", const=True, default=None,
                   help="with --steps >= 2: the mean of the steps' clean-mask estimates instead of the last one (a "
                        "self-ensemble along the path, no extra network call; default: the plans' "
                        "flow_matching.path_mean)")
    p.add_argument("--mc_dropout", action="store_true",
                   help="each of the --num_samples samples runs its own thinned network (MC dropout; needs a model "
                        "trained with dropout, e.g. -tr MedFlowSegTrainer_dropout): model-level sample diversity")
    p.add_argument("--no_temperature", action="store_true",
                   help="do not recalibrate the probabilities with what each fold fitted on its validation "
                        "(fold_X/temperature.json: its temperature and top-label map)")
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
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the input cases into this many disjoint parts (one worker each; default 1)")
    p.add_argument("-part_id", type=int, default=0, help="which part this worker predicts (0 .. num_parts-1)")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    tune_cpu_allocator()  # each sliding-window tile reuses the last one's pages (medflowseg_nn.cpu_allocator)
    if args.m is None and args.d is None:
        raise UserError("give the model as -m MODEL_FOLDER or as -d DATASET [-c CONFIG -tr TRAINER -p PLANS]")
    from medflowseg_nn.inference.runner import UNCERTAINTY_SUBFOLDER, ExportOptions, PredictionSettings, predict_folder

    if args.steps is not None and args.steps < 1 or args.num_samples < 1:
        raise UserError("--steps and --num_samples must be >= 1")
    if args.mc_dropout and args.num_samples < 2:
        raise UserError("--mc_dropout samples thinned networks: give --num_samples K >= 2")
    if args.overwrite and args.continue_prediction:
        raise UserError("--overwrite and --continue_prediction contradict each other; pick one")
    model = args.m or model_folder_from_args(args.d, args.c, args.tr, args.p)
    if not os.path.isdir(model):
        raise UserError(f"model folder {model} does not exist")
    uncertainty = None
    if args.save_uncertainty is not None:
        uncertainty = args.save_uncertainty or os.path.join(args.o, UNCERTAINTY_SUBFOLDER)
    settings = PredictionSettings(
        folds=None if args.f is None else tuple(args.f), checkpoint=args.chk, step_size=args.step_size,
        disable_tta=args.disable_tta, device=pick_device(args.device), steps=args.steps, solver=args.solver,
        seed=args.seed, num_samples=args.num_samples, hypotheses=args.hypotheses, model_samples=args.mc_dropout,
        path_mean=args.path_mean,
        use_temperature=not args.no_temperature,
        overwrite=args.overwrite,
        num_processes_preprocessing=args.npp, num_processes_export=args.nps, verbose=args.verbose,
        num_parts=args.num_parts, part_id=args.part_id)
    options = ExportOptions(save_probabilities=args.save_probabilities, uncertainty_folder=uncertainty,
                            overlay_folder=args.overlay_png)
    failures = predict_folder(input_folder=args.i, output_folder=args.o, model_folder=model, settings=settings,
                              options=options, prev_stage_predictions=args.prev_stage_predictions)
    if failures:
        print(f"error: {len(failures)} case(s) could not be predicted (all others were written to {args.o}):",
              file=sys.stderr)
        for problem in failures.values():
            print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
