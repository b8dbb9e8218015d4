"""Side by side on a held-out test set: nnU-Net single model, nnU-Net fold ensemble, ours at several sampler settings.

Protocol (issue #9): the last ``--n_test`` case ids (sorted) are a TEST set no model trains on. The other cases get
a 5-fold split (nnU-Net's ``generate_crossval_split``, seed 12345) written to ``splits_final.json`` in the
preprocessed folder. Same plans for all (MedFlowSegPlans with ``batch_size`` set to ``--batch_size``; nnU-Net
trains on their PlainConvUNet copy, ``common.plain_unet_plans``), ``--epochs`` x ``--iterations_per_epoch``.
Models: nnU-Net fold 0 for every seed in ``--seeds``, nnU-Net folds ``--ensemble_folds`` (first seed; fold 0 is
shared, unless ``--ensemble_epochs`` trains every member for its own number of epochs); ours (``--ours_trainer``)
fold 0 for every seed, and folds ``--ours_ensemble_folds`` (first seed). The seed sets torch/numpy before training
(network init); augmentation workers are not seeded. Trained weights are cached in ``WORK/value_models`` (rerun =
predict).

Inference from the raw images, TTA off (``--tta``: mirroring, nnU-Net's default): nnU-Net single = nnUNetPredictor;
ensemble = mean of the members' softmax probabilities in the raw geometry (``value_ensemble``; ours's likewise, one
step each); ours = MedFlowSegPredictor (prior seed 0): 1 Euler step, Euler N=2, N=4, Heun N=2, K=4 at 1 step and at
the best multi-step setting by mean Dice on ``--select_cases`` fold-0 VALIDATION cases, first seed's model
(``--hypotheses``: K=4 there with drawn hypotheses; ``--mc_dropout [K]``: K one-step samples of a dropout model).
"+ T": each run's temperature fitted on ``--temperature_cases`` (default all) validation cases of its fold, as
``mfs_train`` fits the product's. Metrics per run: mean foreground Dice and HD95 (``medflowseg_nn.evaluation``),
calibration (``medflowseg_nn.calibration``: ECE 15 bins, Brier, NLL, AURC) over all test voxels and the reference
ROI (foreground dilated by ``--roi_dilation`` voxels), Spearman between a case's mean predictive entropy (ROI /
all) and 1 - its mean foreground Dice, network s/case (ensembles: their members' sum). Mean over seeds (min-max).

    python benchmarks/bench_value.py --work /work/bench_work                  # ~1 h on 2 CPU cores
    python benchmarks/bench_value.py --epochs 1 --iterations_per_epoch 2 --max_test_cases 3 --select_cases 2
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from value_ensemble import fold_ensemble  # noqa: E402
from value_models import ensemble_folds, member_key, members_apart, prepare, read_case, train_all  # noqa: E402
from value_report import RunScores, tables  # noqa: E402

logger = logging.getLogger("benchmarks.value")
SINGLE = [("1 step", "euler", 1, 1), ("Euler N=2", "euler", 2, 1), ("Euler N=4", "euler", 4, 1),
          ("Heun N=2", "heun", 2, 1)]


def write_splits(folder: Path, cases: list[str], n_test: int) -> tuple[list[str], list[dict]]:
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from medflowseg_nn.inference.runner import save_json_atomic
    test, pool = cases[-n_test:], cases[:-n_test]
    splits = generate_crossval_split(pool, seed=12345, n_splits=5)
    path = folder / "splits_final.json"
    if path.is_file() and json.loads(path.read_text()) == splits:
        return test, splits  # value_models.py processes started side by side: the first one wrote it
    if path.is_file():
        logger.warning("overwriting %s with the held-out-test splits", path)
    save_json_atomic(splits, str(path))  # rename: a reader never sees a half-written file
    return test, splits


def make_predictor(trainer, method: str, args: argparse.Namespace, solver: str = "euler", steps: int = 1,
                   k: int = 1, hypotheses: str = "mean", model_samples: bool = False, path_mean: bool = False):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    trainer.set_deep_supervision_enabled(False)
    network = trainer.network.eval()
    kw = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta, perform_everything_on_device=True,
              device=torch.device(args.device), verbose=False, allow_tqdm=False)
    predictor = (nnUNetPredictor(**kw) if method == "nnunet" else
                 MedFlowSegPredictor(**kw, steps=steps, solver=solver, seed=0, num_samples=k,
                                     hypotheses=hypotheses, model_samples=model_samples, path_mean=path_mean))
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def probabilities(predictor, data, props: dict, threads: int) -> tuple[np.ndarray, float]:
    """Raw-geometry probabilities [C, *S] (array layout of the SimpleITK-read label) and network seconds."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    t0 = time.perf_counter()
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    wall = time.perf_counter() - t0
    _, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, props,
        return_probabilities=True, num_threads_torch=threads)
    return np.asarray(probs, dtype=np.float32), wall


def select_setting(trainer, args: argparse.Namespace, cases: list[str], inputs) -> tuple[str, str, int]:
    """The multi-step single-sample setting with the best mean Dice on fold-0 VALIDATION cases (ties: cheaper)."""
    from medflowseg_nn.evaluation import dice
    scores = {}
    for name, solver, steps, *_ in SINGLE[1:]:
        pred = make_predictor(trainer, "ours", args, solver, steps)
        d = []
        for case in cases:
            data, props, ref, _, _ = inputs(case)
            probs, _ = probabilities(pred, data, props, args.threads)
            seg = probs.argmax(0)
            d.append(np.mean([dice(ref == c, seg == c) for c in trainer.label_manager.foreground_labels]))
        scores[name] = float(np.mean(d))
    best = max(scores, key=scores.get)  # dict order = cost order; max keeps the first of equal scores
    logger.info("validation Dice per setting %s -> K=4 at %s", scores, best)
    args.selection = {"cases": cases, "dice": scores, "best": best}
    return next((n, s, st) for n, s, st, *_ in SINGLE if n == best)


def fit_run_temperature(predictor, args: argparse.Namespace, cases: list[str], inputs) -> float:
    """Temperature of one run (model + sampler setting), fitted on fold-0 VALIDATION cases in their reference ROI
    (``medflowseg_nn.temperature``); the test set is never seen."""
    from medflowseg_nn.calibration import reference_roi
    from medflowseg_nn.temperature import fit_temperature
    got = [inputs(case) for case in cases]  # (data, props, reference, ...)
    probs = [probabilities(predictor, g[0], g[1], args.threads)[0] for g in got]
    return fit_temperature(probs, [g[2] for g in got], [reference_roi(g[2], args.roi_dilation) for g in got])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4", help="dataset id or name (default 4 = Dataset004_Hippocampus)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iterations_per_epoch", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--val_iterations", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ensemble_folds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ours_trainer", default="MedFlowSegTrainer", help="trainer class name")
    from medflowseg_nn.inference.sampler import HYPOTHESES
    p.add_argument("--hypotheses", nargs="*", default=[], choices=[h for h in HYPOTHESES if h != "mean"],
                   help="rows of ours with K=4 drawn hypotheses (mfs_predict --hypotheses) at the picked setting")
    p.add_argument("--mc_dropout", type=int, nargs="?", const=4, default=0, metavar="K", help="a row of ours with "
                   "K (4) one-step model samples (mfs_predict --mc_dropout; needs an --ours_trainer with dropout)")
    p.add_argument("--one_step_only", action="store_true", help="ours at one step only (no multi-step or K rows, "
                   "no selection on validation): a quick accuracy check of a trainer variant")
    p.add_argument("--ensemble_epochs", type=int, default=None, help="epochs of every fold-ensemble member (default "
                   "--epochs); e.g. --epochs 30 --ensemble_epochs 10: one model at a 3-fold ensemble's training cost")
    p.add_argument("--ours_ensemble_folds", type=int, nargs="*", default=[],
                   help="folds of ours (first seed, one step) whose mean is the 'ours ensemble' row; none: no row")
    p.add_argument("--flow", nargs="*", default=[], metavar="KEY=VALUE",
                   help="set keys of the plans' flow_matching block for our models (dots for the network block: "
                        "network.time_scaled_x_t=true); they become part of our models' cache names")
    p.add_argument("--n_test", type=int, default=40, help="held-out test cases: the last N case ids, sorted")
    p.add_argument("--max_test_cases", type=int, default=None, help="predict only the first K test cases (smoke)")
    p.add_argument("--select_cases", type=int, default=8, help="fold-0 validation cases that pick K=4's setting")
    p.add_argument("--temperature_cases", type=int, default=None, help="validation cases of its fold each + T run "
                   "is fitted on (default: all of them, as mfs_train fits the product's temperature.json)")
    p.add_argument("--roi_dilation", type=int, default=3)
    p.add_argument("--no_temperature", action="store_true", help="skip the temperature-scaled (+ T) rows")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation for every model (nnU-Net's "
                   "and mfs_predict's default; off by default here for speed)")
    p.add_argument("--no_save", action="store_true", help="do not write CASE.npz / CASE.nii.gz per run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--n_proc_da", default="1", help="nnUNet_n_proc_DA (augmentation workers) for training")
    p.add_argument("-device", default="cpu")
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--out_dir", type=Path, default=C.REPO_ROOT / "benchmarks" / "out" / "value")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    bench = prepare(args)
    from medflowseg_nn.temperature import apply_temperature
    name, plans, dataset_json, test, splits = bench.name, bench.plans, bench.dataset_json, bench.test, bench.splits
    info = C.machine_info()
    s0 = args.seeds[0]
    models = train_all(args, plans, dataset_json)
    train_done = time.perf_counter()

    any_trainer = models[f"ours_f0_s{s0}"][0]
    labels = list(any_trainer.label_manager.foreground_labels)

    @functools.lru_cache(maxsize=256)  # every run's + T fit reads its fold's validation cases: preprocess once
    def inputs(case: str):
        return read_case(bench, any_trainer, case)

    sel_cases = sorted(splits[0]["val"])[: args.select_cases]
    args.selection = {"cases": sel_cases, "dice": {}, "best": "1 step"}  # what --one_step_only reports
    best_name, best_solver, best_steps = ("1 step", "euler", 1) if args.one_step_only else select_setting(
        models[f"ours_f0_s{s0}"][0], args, sel_cases, inputs)
    ours_settings = SINGLE[:1] if args.one_step_only else SINGLE + [("K=4 1 step", "euler", 1, 4)]
    if best_name != "1 step":
        ours_settings.append((f"K=4 {best_name}", best_solver, best_steps, 4))
    drawn = (best_name, best_solver, best_steps) if best_name != "1 step" else ("Euler N=2", "euler", 2)
    ours_settings += [(f"K=4 {drawn[0]} {h}", *drawn[1:], 4, h) for h in args.hypotheses]
    ours_settings += [(f"K={args.mc_dropout} 1 step MC dropout", "euler", 1, args.mc_dropout, "mean", True)
                      ] if args.mc_dropout else []
    runs: dict[str, tuple[str, Any]] = {}  # run id -> (method row, predictor or member list)
    for seed in args.seeds:
        runs[f"nnunet_single_s{seed}"] = ("nnU-Net single (fold 0)",
                                          make_predictor(models[f"nnunet_f0_s{seed}"][0], "nnunet", args))
    fold0 = {f"nnunet_f0_s{s0}": f"nnunet_single_s{s0}", f"ours_f0_s{s0}": f"ours_1_step_s{s0}"}  # its run id

    def member_run(method: str, fold: int) -> str:  # a member that is a single-model run is predicted once
        return fold0.get(member_key(method, fold, args), member_key(method, fold, args))
    for seed in args.seeds:
        for label, solver, steps, k, *drawn_from in ours_settings:
            runs[f"ours_{label}_s{seed}".replace(" ", "_")] = (f"ours {label}", make_predictor(
                models[f"ours_f0_s{seed}"][0], "ours", args, solver, steps, k, *drawn_from))
    for method in ("nnunet", "ours"):  # the members that are not a single-model run: predicted, scored as members
        for fold in ensemble_folds(method, args):
            if (key := member_key(method, fold, args)) not in fold0:
                runs[key] = ("", make_predictor(models[key][0], method, args))
    # + T rows (nnU-Net single, ours 1 step, every ours row with K > 1): one T per run, fitted on t_cases
    calibrated = {"nnU-Net single (fold 0)", "ours 1 step", *(f"ours {s[0]}" for s in ours_settings if s[3] > 1)}
    t_cases, t_note = sorted(splits[0]["val"])[: args.temperature_cases], args.temperature_cases or "all"
    temps = {rid: fit_run_temperature(pred, args, t_cases, inputs) for rid, (row, pred) in runs.items()
             if row in calibrated and not args.no_temperature}
    logger.info("temperatures %s", temps)
    scores = {rid: RunScores(labels, args.roi_dilation) for rid, (row, _) in runs.items() if row}
    scores.update({f"{rid}+T": RunScores(labels, args.roi_dilation) for rid in temps})
    fit = None if args.no_temperature else (lambda rid, fold: fit_run_temperature(
        runs[rid][1], args, sorted(splits[fold]["val"])[: args.temperature_cases], inputs))
    each = f", {args.ensemble_epochs} epochs each" if members_apart(args) else ""
    ensembles = [fold_ensemble(f"{method}_ensemble_{len(folds)}folds", f"{title} ({len(folds)} folds, {how}{each})",
                               folds, lambda f, m=method: member_run(m, f), temps, fit)
                 for method, title, how in [("nnunet", "nnU-Net ensemble", "softmax mean"),
                                            ("ours", "ours ensemble", "1 step each, mean")]
                 if (folds := ensemble_folds(method, args))]  # an "ensemble" of one fold is the single model: no row
    for ens in ensembles:
        scores.update({sid: RunScores(labels, args.roi_dilation) for sid in ens.rows()})
        logger.info("%s member temperatures %s", ens.run_id, dict(ens.temperatures))
    pred_root = None if args.no_save else args.work / "value_predictions"
    for i, case in enumerate(test):
        data, props, ref, spacing, img = inputs(case)
        outputs = {}
        for rid, (row, predictor) in runs.items():
            probs, sec = outputs[rid] = probabilities(predictor, data, props, args.threads)
            if row:
                d = scores[rid].add(case, probs, ref, spacing, sec, pred_root and pred_root / rid, img)
                logger.info("%s [%d/%d] %s: Dice %.3f, %.2f s", case, i + 1, len(test), rid, d, sec)
            if rid in temps:
                scores[f"{rid}+T"].add(case, apply_temperature(probs, temps[rid]), ref, spacing, sec, None, img)
        for ens in ensembles:
            ens.add(case, outputs, scores, ref, spacing, pred_root, img)
    results: dict[str, list[dict]] = {}
    rows_of = {rid: row for rid, (row, _) in runs.items() if row}
    rows_of.update({f"{rid}+T": f"{rows_of[rid]} + T" for rid in temps})
    rows_of.update({k: r for ens in ensembles for k, r in ens.rows().items()})
    for rid, sc in scores.items():
        results.setdefault(rows_of[rid], []).append({"run": rid, **sc.summary()})
    ens_rows = [[r for e in ensembles if e.run_id.startswith(m) for r in (e.row, e.member_row)] for m in ("nn", "ou")]
    order = [rows_of[f"nnunet_single_s{s0}"], *ens_rows[0], *(f"ours {s[0]}" for s in ours_settings), *ens_rows[1]]
    order = [r for m in order for r in (m, f"{m} + T") if r in results]
    results = {m: results[m] for m in order}
    seg_table, cal_table = tables(results)
    total_s = time.perf_counter() - t_start
    budget = (f"{args.epochs} epochs x {args.iterations_per_epoch} iterations (ensemble members: "
              f"{args.ensemble_epochs or args.epochs} epochs), batch {args.batch_size}, "
              f"seeds {args.seeds}, ours = {args.ours_trainer}{''.join(' ' + f for f in args.flow)}")
    tta = f"TTA {'on (mirroring)' if args.tta else 'off'}; " + ("" if args.no_temperature else
                                                              f"+ T fitted on {t_note} validation cases of each fold; ")
    head = (f"{name} {args.configuration}, {len(test)} held-out test cases ({test[0]} .. {test[-1]}), {budget}; "
            + (f"{tta}ours at one step only (--one_step_only: no K=4 selection); " if args.one_step_only else
               f"{tta}K=4 setting picked on {len(sel_cases)} fold-0 validation cases: {args.selection['best']} "
               f"({', '.join(f'{k} {v:.3f}' for k, v in args.selection['dice'].items())}); ")
            + f"train {train_done - t_start:.0f} s, total {total_s:.0f} s")
    print(f"\n{head}\n\nA. Segmentation, case-level Spearman, network s/case (mean over seeds, min–max)\n{seg_table}"
          f"\n\nB. Calibration, pooled over test voxels: all voxels / ROI = reference foreground dilated by "
          f"{args.roi_dilation} voxels (cube)\n{cal_table}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "value", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "test_cases": test, "splits": splits, "selection": args.selection, "temperatures": temps,
               "ensemble_member_temperatures": {e.run_id: dict(e.temperatures) for e in ensembles},
               "train_s": {k: v[1] for k, v in models.items()}, "total_s": total_s, "results": results,
               "per_case": {rid: sc.cases for rid, sc in scores.items()}, "head": head, "table_segmentation":
               seg_table, "table_calibration": cal_table}
    out = args.out_dir / f"bench_value_{args.budget_tag}{f'_members_e{args.ensemble_epochs}' if each else ''}"
    C.write_json(out.with_suffix(".json"), payload)
    out.with_suffix(".md").write_text(
        f"{head}\n\n```\n{' '.join(info['argv'])}\n```\n\n{seg_table}\n\n{cal_table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
