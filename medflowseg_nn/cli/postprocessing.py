"""``mfs_determine_postprocessing`` / ``mfs_apply_postprocessing``: nnU-Net's connected-component postprocessing.

``mfs_determine_postprocessing -i PRED -ref REF`` runs nnU-Net's ``determine_postprocessing`` on any prediction
folder with references (best: the cross-validation predictions of all folds, or an ensemble of them): keep only
the largest foreground component, then the largest component per label / region, each kept only when it
improves Dice (the foreground rule: for no class worse). It writes ``PRED/postprocessing.pkl`` and
``postprocessing.json`` (and ``PRED/postprocessed/``). ``mfs_apply_postprocessing -i IN -o OUT -pp_pkl_file
PRED/postprocessing.pkl`` applies them with nnU-Net's ``apply_postprocessing_to_folder``. Flags are nnU-Net's;
``plans.json`` / ``dataset.json`` default to those ``mfs_predict`` / ``mfs_ensemble`` write into the folder.
Both functions work unchanged with the CPU torch wheel; this module only checks the inputs first, so that a
mistake is one ``error:`` line instead of an assertion deep in a worker process.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, setup_logging
from medflowseg_nn.errors import UserError

logger = logging.getLogger(__name__)


def folder_json(folder: str, name: str, given: Optional[str]) -> dict:
    """The ``-plans_json`` / ``-dataset_json`` file, or ``folder/name``, loaded; a clear error if missing."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    path = given or os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found — mfs_predict writes it into its output folder; pass "
                        f"-{name.replace('.', '_')} FILE (e.g. MODEL_FOLDER/{name})")
    return load_json(path)


def segmentation_files(folder: str, ending: str, what: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{what} folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.endswith(ending) and not f.startswith("."))
    if not files:
        raise UserError(f"no *{ending} segmentations in {what} folder {folder}")
    return files


def quiet_call(func, **kwargs):
    """Call an nnU-Net function with its ``print`` output sent to the log (INFO, prefixed ``nnU-Net:``)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = func(**kwargs)
    for line in buffer.getvalue().splitlines():
        logger.info("nnU-Net: %s", line)
    return result


def determine(prediction_folder: str, reference_folder: str, plans_json: Optional[str] = None,
              dataset_json: Optional[str] = None, num_processes: int = 2,
              keep_postprocessed: bool = True) -> dict:
    """nnU-Net's ``determine_postprocessing``; returns the ``postprocessing.json`` it writes (Dice before / after,
    the chosen functions and their arguments)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    plans = folder_json(prediction_folder, "plans.json", plans_json)
    dataset = folder_json(prediction_folder, "dataset.json", dataset_json)
    ending = dataset["file_ending"]
    predictions = segmentation_files(prediction_folder, ending, "prediction")
    references = set(segmentation_files(reference_folder, ending, "reference"))
    missing = [f for f in predictions if f not in references]
    if missing:
        raise UserError(f"{len(missing)} prediction(s) have no reference in {reference_folder} (e.g. {missing[0]})"
                        " — -ref must hold a label file of the same name for every prediction")
    if num_processes < 1:
        raise UserError(f"-np must be >= 1, got {num_processes}")
    quiet_call(determine_postprocessing, folder_predictions=prediction_folder, folder_ref=reference_folder,
               plans_file_or_dict=plans, dataset_json_file_or_dict=dataset, num_processes=num_processes,
               keep_postprocessed_files=keep_postprocessed)
    return load_json(os.path.join(prediction_folder, "postprocessing.json"))


def apply(input_folder: str, output_folder: str, pp_pkl_file: str, plans_json: Optional[str] = None,
          dataset_json: Optional[str] = None, num_processes: int = 2) -> list[str]:
    """nnU-Net's ``apply_postprocessing_to_folder`` with the functions in ``pp_pkl_file``; returns the files
    written. ``plans.json`` / ``dataset.json`` are copied into ``output_folder`` so it can be used further."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, save_json
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing_to_folder

    if not os.path.isfile(pp_pkl_file):
        raise UserError(f"postprocessing file {pp_pkl_file} not found — run mfs_determine_postprocessing first")
    try:
        pp_fns, pp_fn_kwargs = load_pickle(pp_pkl_file)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
        raise UserError(f"{pp_pkl_file} is not a postprocessing.pkl of mfs_determine_postprocessing "
                        f"({type(e).__name__})") from e
    plans = folder_json(input_folder, "plans.json", plans_json)
    dataset = folder_json(input_folder, "dataset.json", dataset_json)
    files = segmentation_files(input_folder, dataset["file_ending"], "input")
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise UserError("-o must differ from -i (the postprocessed files would replace the predictions)")
    if num_processes < 1:
        raise UserError(f"-np must be >= 1, got {num_processes}")
    quiet_call(apply_postprocessing_to_folder, input_folder=input_folder, output_folder=output_folder,
               pp_fns=pp_fns, pp_fn_kwargs=pp_fn_kwargs, plans_file_or_dict=plans,
               dataset_json_file_or_dict=dataset, num_processes=num_processes)
    save_json(plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    save_json(dataset, os.path.join(output_folder, "dataset.json"), sort_keys=False)
    logger.info("postprocessing %s applied to %d file(s)", [f.__name__ for f in pp_fns] or "(none)", len(files))
    return files


def add_json_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-plans_json", default=None, help="plans file (default: the input folder's plans.json)")
    p.add_argument("-dataset_json", default=None, help="dataset.json (default: the input folder's dataset.json)")
    p.add_argument("-np", type=int, default=2, help="processes (default 2)")
    p.add_argument("--verbose", action="store_true")


@cli_errors
def main_determine(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mfs_determine_postprocessing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="prediction folder (e.g. cross-validation predictions)")
    p.add_argument("-ref", required=True, help="folder with the reference labels")
    p.add_argument("--remove_postprocessed", action="store_true", help="do not keep PRED/postprocessed/")
    add_json_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    result = determine(prediction_folder=args.i, reference_folder=args.ref, plans_json=args.plans_json,
                       dataset_json=args.dataset_json, num_processes=args.np,
                       keep_postprocessed=not args.remove_postprocessed)
    before, after = (result[k]["foreground_mean"]["Dice"] for k in ("input_folder", "postprocessed"))
    chosen = [f"{fn}({kw.get('labels_or_regions')})" for fn, kw in
              zip(result["postprocessing_fns"], result["postprocessing_kwargs"])]
    print(f"foreground mean Dice {before:.4f} -> {after:.4f}; postprocessing: {', '.join(chosen) or 'none'}\n"
          f"written: {os.path.join(args.i, 'postprocessing.pkl')}")
    return 0


@cli_errors
def main_apply(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mfs_apply_postprocessing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="input folder with segmentations")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-pp_pkl_file", required=True, help="postprocessing.pkl of mfs_determine_postprocessing")
    add_json_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    files = apply(input_folder=args.i, output_folder=args.o, pp_pkl_file=args.pp_pkl_file,
                  plans_json=args.plans_json, dataset_json=args.dataset_json, num_processes=args.np)
    print(f"{len(files)} segmentation(s) postprocessed into {args.o}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_determine())
