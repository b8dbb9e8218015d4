"""``mfs_export_model_to_zip`` / ``mfs_install_pretrained_model_from_zip``: share a trained model as one zip.

``mfs_export_model_to_zip -d D -c C -tr TR -p P -f F -o FILE.zip`` (nnU-Net's flags; trainer and plans default
to ``MedFlowSegTrainer`` / ``MedFlowSegPlans``) runs nnU-Net's ``export_pretrained_model``: per fold the
checkpoints (``-chk``), ``progress.png``, ``validation/summary.json`` (all predictions with ``--exp_cv_preds``), our
``temperature.json`` (appended: nnU-Net's export does not know it; with ``temperature_own_fold.json`` where
``mfs_pool_calibration`` kept the fold's own fit), and per configuration the results folder's
``plans.json``, ``dataset.json`` and ``dataset_fingerprint.json``.
That ``plans.json`` carries the ``flow_matching`` block the trainer resolved and trained with (every key written
out), so the installed model predicts the same way whatever a later version of this code takes as default; the
export refuses a model whose block is missing or incomplete.

``mfs_install_pretrained_model_from_zip FILE.zip`` unpacks it into ``$nnUNet_results`` with nnU-Net's
``install_model_from_zip_file`` (after checking that every member stays inside that folder). Both nnU-Net
functions work with the CPU torch wheel; nnU-Net's ``print`` output goes to the log.
"""
from __future__ import annotations

import argparse
import itertools
import os
import zipfile
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, require_env, setup_logging
from medflowseg_nn.cli.postprocessing import quiet_call
from medflowseg_nn.cli.train import DEFAULT_PLANS, DEFAULT_TRAINER
from medflowseg_nn.errors import UserError
from medflowseg_nn.pooled_calibration import OWN_FOLD_FILE
from medflowseg_nn.temperature import TEMPERATURE_FILE


def results_dataset_name(dataset: str) -> str:
    """``4`` / ``Dataset004_X`` → the dataset's folder name, found in nnUNet_raw, _preprocessed or _results."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise UserError(f"unknown dataset {dataset!r}: no Dataset{dataset.zfill(3)}_* folder in nnUNet_results "
                        f"({os.environ.get('nnUNet_results')})") from e


def check_model_folder(folder: str, folds: Sequence[str], checkpoints: Sequence[str], strict: bool) -> bool:
    """Raise :class:`UserError` naming what nnU-Net's export would miss; ``False`` = skip (not strict)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig

    if not os.path.isdir(folder):
        if strict:
            raise UserError(f"no trained model at {folder} — check -d/-c/-tr/-p (or pass --not_strict)")
        return False
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)} is missing — the trainer writes it; retrain or copy it")
    block = load_json(os.path.join(folder, "plans.json")).get(PLANS_KEY)
    try:
        complete = block is not None and FlowMatchingConfig.from_dict(block).to_dict() == block
    except ValueError:
        complete = False
    if not complete:
        raise UserError(f"{folder}/plans.json has no complete '{PLANS_KEY}' block (not a MedFlowSeg model, or "
                        "trained by an older version) — the zip would load with other defaults; add the block")
    for fold in folds:
        fold_dir = os.path.join(folder, f"fold_{fold}")
        needed = [*checkpoints, "progress.png", os.path.join("validation", "summary.json")]
        for name in needed:
            if not os.path.isfile(os.path.join(fold_dir, name)):
                raise UserError(f"{os.path.join(fold_dir, name)} is missing — finish training fold {fold} (its "
                                f"validation writes summary.json: mfs_train ... {fold} --val), or leave it out of -f")
    return True


def export_model(dataset: str, output_file: str, configurations: Sequence[str], trainer: str = DEFAULT_TRAINER,
                 plans: str = DEFAULT_PLANS, folds: Sequence[str] = ("0", "1", "2", "3", "4"),
                 checkpoints: Sequence[str] = ("checkpoint_final.pth",), strict: bool = True,
                 export_crossval_predictions: bool = False) -> list[str]:
    """nnU-Net's ``export_pretrained_model`` after the checks above; returns the zip's member names."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    results = require_env("nnUNet_results")
    name = results_dataset_name(str(dataset))
    folds = [f if f == "all" else str(int(f)) for f in map(str, folds)]
    present = [c for c in configurations if check_model_folder(
        os.path.join(results, name, f"{trainer}__{plans}__{c}"), folds, checkpoints, strict)]
    if not present:
        raise UserError(f"none of the configurations {list(configurations)} is trained for {name} with {trainer}")
    if not output_file.endswith(".zip"):
        raise UserError(f"-o must name a .zip file, got {output_file}")
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    quiet_call(export_pretrained_model, dataset_name_or_id=name, output_file=output_file,
               configurations=tuple(present), trainer=trainer, plans_identifier=plans,
               folds=tuple(f if f == "all" else int(f) for f in folds), strict=strict,
               save_checkpoints=tuple(checkpoints), export_crossval_predictions=export_crossval_predictions)
    with zipfile.ZipFile(output_file, "a") as z:  # nnU-Net's export knows nothing of the fold temperatures
        for c in present:
            for f, file in itertools.product(folds, (TEMPERATURE_FILE, OWN_FOLD_FILE)):
                src = os.path.join(results, name, f"{trainer}__{plans}__{c}", f"fold_{f}", file)
                if os.path.isfile(src):
                    z.write(src, os.path.relpath(src, results))
        return z.namelist()


def install_model(zip_file: str) -> list[str]:
    """nnU-Net's ``install_model_from_zip_file`` into ``$nnUNet_results``; returns the model folders installed."""
    from nnunetv2.model_sharing.model_import import install_model_from_zip_file

    results = require_env("nnUNet_results")
    if not os.path.isfile(zip_file) or not zipfile.is_zipfile(zip_file):
        raise UserError(f"{zip_file} is not a zip file — give the file mfs_export_model_to_zip wrote")
    with zipfile.ZipFile(zip_file) as z:
        names = z.namelist()
    root = os.path.realpath(results)
    for n in names:
        target = os.path.realpath(os.path.join(root, n))
        if os.path.isabs(n) or os.path.commonpath([root, target]) != root:
            raise UserError(f"{zip_file} contains {n!r}, outside nnUNet_results — refusing to install it")
    models = sorted({os.path.dirname(n) for n in names if n.endswith("/plans.json") or n == "plans.json"})
    if not models:
        raise UserError(f"{zip_file} holds no model (no DATASET/TRAINER__PLANS__CONFIG/plans.json)")
    os.makedirs(results, exist_ok=True)
    quiet_call(install_model_from_zip_file, zip_file=zip_file)
    return [os.path.join(results, m) for m in models]


@cli_errors
def main_export(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mfs_export_model_to_zip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-o", required=True, help="output zip file")
    p.add_argument("-c", nargs="+", default=("3d_fullres",), help="configurations (default 3d_fullres)")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default=DEFAULT_PLANS, help=f"plans identifier (default {DEFAULT_PLANS})")
    p.add_argument("-f", nargs="+", default=("0", "1", "2", "3", "4"), help="folds (default 0 1 2 3 4)")
    p.add_argument("-chk", nargs="+", default=("checkpoint_final.pth",), help="checkpoints to export")
    p.add_argument("--not_strict", action="store_true", help="allow missing configurations")
    p.add_argument("--exp_cv_preds", action="store_true", help="also export the cross-validation predictions")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    names = export_model(dataset=args.d, output_file=args.o, configurations=args.c, trainer=args.tr, plans=args.p,
                         folds=args.f, checkpoints=args.chk, strict=not args.not_strict,
                         export_crossval_predictions=args.exp_cv_preds)
    print(f"{len(names)} file(s) written to {args.o}")
    return 0


@cli_errors
def main_install(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mfs_install_pretrained_model_from_zip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zip", help="zip file of mfs_export_model_to_zip (or nnUNetv2_export_model_to_zip)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    for folder in install_model(zip_file=args.zip):
        print(f"installed {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_export())
