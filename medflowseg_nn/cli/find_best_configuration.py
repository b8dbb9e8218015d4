"""``mfs_find_best_configuration D -c 2d 3d_fullres -f 0 1 2 3 4``: pick the best model or ensemble by cross-validation.

nnU-Net's procedure (``nnUNetv2_find_best_configuration``, same flags) on MedFlowSeg models: for every trained
``TRAINER__PLANS__CONFIGURATION`` the folds' final-validation segmentations are merged and scored with nnU-Net's
``accumulate_cv_results``; every pair of models is ensembled from the folds' validation probabilities
(``fold_F/validation/CASE.npz``, written by ``mfs_train ... --npz``) with nnU-Net's ``ensemble_crossvalidations``
and scored with ``compute_metrics_on_folder``; the highest foreground-mean Dice wins (ties: the first, i.e. a
single model before an ensemble), its postprocessing is decided with nnU-Net's ``determine_postprocessing``.
Written to ``nnUNet_results/DATASET``: ``inference_information.json`` (nnU-Net's keys) and
``inference_instructions.txt``, whose ``mfs_predict`` / ``mfs_ensemble`` / ``mfs_apply_postprocessing`` lines run
as written once ``INPUT_FOLDER`` / ``OUTPUT_FOLDER*`` are replaced (every other line is a ``#`` comment).

For the flow model the cross-validation scores what the final validation predicted: one sample from the plans'
``prior_seed`` with the plans' step count and mirroring; ``mfs_predict`` with its defaults reproduces that.
nnU-Net's own functions are called directly; what they look up by trainer name or print is not used (their
prints go to the log at INFO, and the instructions name our commands).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, dataset_name, require_env, setup_logging
from medflowseg_nn.cli.postprocessing import quiet_call
from medflowseg_nn.cli.train import DEFAULT_PLANS, DEFAULT_TRAINER
from medflowseg_nn.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
INFORMATION_FILE = "inference_information.json"
INSTRUCTIONS_FILE = "inference_instructions.txt"


@dataclass(frozen=True)
class TrainedModel:
    """One trained ``TRAINER__PLANS__CONFIGURATION`` results folder of a dataset."""

    trainer: str
    plans: str
    configuration: str
    folder: str

    @property
    def identifier(self) -> str:
        return f"{self.trainer}__{self.plans}__{self.configuration}"


def folds_string(folds: Sequence[int]) -> str:
    """``(0, 1, 2)`` → ``0_1_2`` (nnU-Net's ``folds_tuple_to_string``)."""
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string
    return folds_tuple_to_string(list(folds))


def train_command(dataset: str, model: TrainedModel, fold: int, extra: str = "") -> str:
    flags = "" if model.trainer == DEFAULT_TRAINER else f" -tr {model.trainer}"
    flags += "" if model.plans == DEFAULT_PLANS else f" -p {model.plans}"
    return f"mfs_train {dataset} {model.configuration} {fold}{flags}{extra}"


def trained_models(dataset: str, configurations: Sequence[str], trainers: Sequence[str],
                   plans: Sequence[str]) -> list[TrainedModel]:
    """The models to compare, in nnU-Net's order (trainers × configurations × plans). A configuration absent from
    a plans file is skipped (logged), like nnU-Net; a missing plans file or results folder is a :class:`UserError`."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    name = dataset_name(dataset)
    preprocessed, results = require_env("nnUNet_preprocessed"), require_env("nnUNet_results")
    models = []
    for trainer, configuration, plan in itertools.product(trainers, configurations, plans):
        plans_file = os.path.join(preprocessed, name, plan + ".json")
        if not os.path.isfile(plans_file):
            raise UserError(f"plans file {plans_file} not found — run `mfs_plan_and_preprocess -d {dataset}` or "
                            f"pass -p with an existing plans identifier")
        if configuration not in load_json(plans_file)["configurations"]:
            logger.info("configuration %s is not in %s: skipped", configuration, plans_file)
            continue
        folder = os.path.join(results, name, f"{trainer}__{plan}__{configuration}")
        model = TrainedModel(trainer, plan, configuration, folder)
        if not os.path.isdir(folder):
            raise UserError(f"no trained model {model.identifier} in {os.path.join(results, name)} — train every "
                            f"fold first (`{train_command(dataset, model, 0, ' --npz')}`, ...) or leave "
                            f"{configuration} out of -c")
        models.append(model)
    if not models:
        raise UserError(f"none of the configurations {', '.join(configurations)} is in the plans "
                        f"{', '.join(plans)} of {name}")
    return models


def check_validation(dataset: str, model: TrainedModel, folds: Sequence[int], need_npz: bool) -> None:
    """Every fold has a final validation (and its ``.npz`` probabilities when ensembles are compared)."""
    for fold in folds:
        validation = os.path.join(model.folder, f"fold_{fold}", "validation")
        if not os.path.isdir(validation):
            raise UserError(f"fold {fold} of {model.identifier} has no {validation} — train it "
                            f"(`{train_command(dataset, model, fold, ' --npz')}`) or finish its validation "
                            f"(`{train_command(dataset, model, fold, ' --val --npz')}`)")
        if need_npz and not any(f.endswith(".npz") for f in os.listdir(validation)):
            raise UserError(f"{validation} has no .npz probabilities, which ensembling needs — rerun the validation "
                            f"with them (`{train_command(dataset, model, fold, ' --val --npz')}`) or pass "
                            f"--disable_ensembling")


def foreground_dice(summary_file: str) -> float:
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    return float(load_summary_json(summary_file)["foreground_mean"]["Dice"])


def ensemble_crossvalidation(pair: Sequence[TrainedModel], output_folder: str, folds: Sequence[int],
                             num_processes: int, overwrite: bool, gt_folder: str) -> float:
    """nnU-Net's ``ensemble_crossvalidations`` of two models' validation probabilities, then its metrics."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.ensembling.ensemble import ensemble_crossvalidations
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    quiet_call(ensemble_crossvalidations, list_of_trained_model_folders=[m.folder for m in pair],
               output_folder=output_folder, folds=list(folds), num_processes=num_processes, overwrite=overwrite)
    plans_manager = PlansManager(join(pair[0].folder, "plans.json"))
    dataset_json = load_json(join(pair[0].folder, "dataset.json"))
    label_manager = plans_manager.get_label_manager(dataset_json)
    quiet_call(compute_metrics_on_folder, folder_ref=gt_folder, folder_pred=output_folder,
               output_file=join(output_folder, "summary.json"),
               image_reader_writer=plans_manager.image_reader_writer_class(),
               file_ending=dataset_json["file_ending"],
               regions_or_labels=label_manager.foreground_regions if label_manager.has_regions
               else label_manager.foreground_labels,
               ignore_label=label_manager.ignore_label, num_processes=num_processes)
    return foreground_dice(join(output_folder, "summary.json"))


def find_best_configuration(dataset: str, configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                            trainers: Sequence[str] = (DEFAULT_TRAINER,), plans: Sequence[str] = (DEFAULT_PLANS,),
                            folds: Sequence[int] = (0, 1, 2, 3, 4), allow_ensembling: bool = True,
                            num_processes: int = 2, overwrite: bool = True) -> dict:
    """Score every trained model and pairwise ensemble by cross-validation, decide the winner's postprocessing,
    write ``inference_information.json`` and ``inference_instructions.txt``; returns the information dict."""
    from batchgenerators.utilities.file_and_folder_operations import join, save_json
    from nnunetv2.evaluation.accumulate_cv_results import accumulate_cv_results
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    if num_processes < 1:
        raise UserError(f"-np must be >= 1, got {num_processes}")
    if not folds or len(set(folds)) != len(folds):
        raise UserError(f"-f needs distinct folds, got {list(folds)}")
    name = dataset_name(dataset)
    results_dir = join(require_env("nnUNet_results"), name)
    gt_folder = join(require_env("nnUNet_preprocessed"), name, "gt_segmentations")
    models = trained_models(dataset, configurations, trainers, plans)
    ensembling = allow_ensembling and len(models) > 1
    for model in models:
        check_validation(name, model, folds, need_npz=ensembling)
    scores: dict[str, dict] = {}
    for model in models:
        merged = join(model.folder, f"crossval_results_folds_{folds_string(folds)}")
        quiet_call(accumulate_cv_results, trained_model_folder=model.folder, merged_output_folder=merged,
                   folds=list(folds), num_processes=num_processes, overwrite=overwrite)
        scores[model.identifier] = {"source": merged, "result": foreground_dice(join(merged, "summary.json")),
                                    "models": [model]}
    if ensembling:
        for pair in itertools.combinations(models, 2):
            key = f"ensemble___{pair[0].identifier}___{pair[1].identifier}___{folds_string(folds)}"
            folder = join(results_dir, "ensembles", key)
            scores[key] = {"source": folder, "models": list(pair),
                           "result": ensemble_crossvalidation(pair, folder, folds, num_processes, overwrite,
                                                              gt_folder)}
    for key, value in scores.items():
        logger.info("cross-validation foreground Dice %.4f: %s", value["result"], key)
    best_key = max(scores, key=lambda k: scores[k]["result"])  # first of ties: single models come first
    best = scores[best_key]
    logger.info("best: %s (%.4f); determining its postprocessing", best_key, best["result"])
    quiet_call(determine_postprocessing, folder_predictions=best["source"], folder_ref=gt_folder,
               plans_file_or_dict=join(best["source"], "plans.json"),
               dataset_json_file_or_dict=join(best["source"], "dataset.json"), num_processes=num_processes,
               keep_postprocessed_files=True)
    information = {
        "folds": list(folds), "dataset_name_or_id": name,
        "considered_models": [{"plans": m.plans, "configuration": m.configuration, "trainer": m.trainer}
                              for m in models],
        "ensembling_allowed": allow_ensembling,
        "all_results": {k: v["result"] for k, v in scores.items()},
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": best["result"],
            "result_on_crossval_post_pp": foreground_dice(join(best["source"], "postprocessed", "summary.json")),
            "postprocessing_file": join(best["source"], "postprocessing.pkl"),
            "some_plans_file": join(best["source"], "plans.json"),
            "selected_model_or_models": [{"configuration": m.configuration, "trainer": m.trainer,
                                          "plans_identifier": m.plans} for m in best["models"]],
        },
    }
    save_json(information, join(results_dir, INFORMATION_FILE), sort_keys=False)
    with open(join(results_dir, INSTRUCTIONS_FILE), "w") as f:
        f.write(inference_instructions(information, results_dir, num_processes) + "\n")
    return information


def predict_command(dataset: str, model: dict, folds: Sequence[int], output_folder: str, save_probabilities: bool,
                    plans_file: str) -> list[str]:
    """``mfs_predict`` line(s) for one selected model; a cascade stage first predicts its previous stage."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    lines, prev = [], ""
    configuration = PlansManager(plans_file).get_configuration(model["configuration"])
    if configuration.previous_stage_name is not None:
        previous = {**model, "configuration": configuration.previous_stage_name}
        lines += predict_command(dataset, previous, folds, f"{output_folder}_PREV_STAGE", False, plans_file)
        prev = f" -prev_stage_predictions {output_folder}_PREV_STAGE"
    lines.append(f"mfs_predict -d {dataset} -i INPUT_FOLDER -o {output_folder} -f {' '.join(map(str, folds))} "
                 f"-tr {model['trainer']} -c {model['configuration']} -p {model['plans_identifier']}{prev}"
                 + (" --save_probabilities" if save_probabilities else ""))
    return lines


def inference_instructions(information: dict, results_dir: str, num_processes: int = 2) -> str:
    """The commands that predict with the winner, as a shell script (explanations are ``#`` comments);
    ``results_dir``: the dataset's folder in ``nnUNet_results`` (the models' ``plans.json`` say what a cascade
    stage needs first)."""
    best = information["best_model_or_ensemble"]
    selected, dataset, folds = best["selected_model_or_models"], information["dataset_name_or_id"], information["folds"]
    ensemble = len(selected) > 1
    lines = [f"# best by cross-validation (folds {' '.join(map(str, folds))}): foreground Dice "
             f"{best['result_on_crossval_pre_pp']:.4f}, {best['result_on_crossval_post_pp']:.4f} after postprocessing",
             "# flow model: the cross-validation used one sample from the plans' prior_seed (mfs_predict's defaults);",
             "# add --num_samples K --save_uncertainty for K samples and uncertainty maps, --seed S for another prior"]
    if ensemble:
        lines.append("# an ensemble won: predict with each member, keeping the probabilities")
    outputs = []
    for j, model in enumerate(selected):
        out = f"OUTPUT_FOLDER_MODEL_{j + 1}" if ensemble else "OUTPUT_FOLDER"
        outputs.append(out)
        plans_file = os.path.join(results_dir, f"{model['trainer']}__{model['plans_identifier']}__"
                                               f"{model['configuration']}", "plans.json")
        lines += predict_command(dataset, model, folds, out, ensemble, plans_file)
    if ensemble:
        lines += ["# then ensemble them (uncertainty maps too, where every member has them)",
                  f"mfs_ensemble -i {' '.join(outputs)} -o OUTPUT_FOLDER -np {num_processes}"]
    lines += ["# once inference is completed, postprocess",
              f"mfs_apply_postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -pp_pkl_file "
              f"{best['postprocessing_file']} -np {num_processes} -plans_json {best['some_plans_file']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_find_best_configuration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_name_or_id")
    p.add_argument("-c", nargs="+", default=list(DEFAULT_CONFIGURATIONS),
                   help="configurations (default: 2d 3d_fullres 3d_lowres 3d_cascade_fullres; absent ones skipped)")
    p.add_argument("-tr", nargs="+", default=[DEFAULT_TRAINER], help=f"trainers (default {DEFAULT_TRAINER})")
    p.add_argument("-p", nargs="+", default=[DEFAULT_PLANS], help=f"plans identifiers (default {DEFAULT_PLANS})")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("-np", type=int, default=2, help="processes for ensembling, metrics, postprocessing (default 2)")
    p.add_argument("--disable_ensembling", action="store_true", help="compare single models only")
    p.add_argument("--no_overwrite", action="store_true", help="reuse merged / ensembled files already written")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    info = find_best_configuration(dataset=args.dataset_name_or_id, configurations=args.c, trainers=args.tr,
                                   plans=args.p, folds=args.f, allow_ensembling=not args.disable_ensembling,
                                   num_processes=args.np, overwrite=not args.no_overwrite)
    results_dir = os.path.join(require_env("nnUNet_results"), info["dataset_name_or_id"])
    for key, dice in info["all_results"].items():
        print(f"{dice:.4f}  {key}")
    best = info["best_model_or_ensemble"]
    print(f"best: {'+'.join(m['configuration'] for m in best['selected_model_or_models'])} "
          f"({best['result_on_crossval_pre_pp']:.4f}, {best['result_on_crossval_post_pp']:.4f} postprocessed)\n"
          f"written: {os.path.join(results_dir, INFORMATION_FILE)}, {os.path.join(results_dir, INSTRUCTIONS_FILE)}")
    with open(os.path.join(results_dir, INSTRUCTIONS_FILE)) as f:
        print(f.read(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
