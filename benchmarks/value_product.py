"""The product's calibration of ONE packed-ensemble model, end to end, beside nnU-Net's single model and fold
ensemble (issue #9): what ``mfs_train`` fits and ``mfs_predict`` exports, not a re-enactment on cached arrays.

For each seed, the cached fold-0 packed model (``value_models``; ``--ours_trainer`` / ``--flow`` name it; trained
when missing): ``trainers.member_temperatures.fit_member_calibrations`` fits each member's T and top-label map on
the fold's validation cases as ``mfs_train`` does (mirroring as ``--tta``), then every held-out test case goes
through ``MedFlowSegPredictor.predict_case`` and ``inference.export.case_arrays`` (the arrays ``mfs_predict``
writes), twice: with the member temperatures only (the product before per-member maps) and with the member maps
(``inference.member_calibration``). nnU-Net: each model's T + top-label map fitted on its own fold's validation
(``value_recalibration``'s cached probabilities); the single fold-0 model predicted live (timed, whole case:
prediction + export), the fold ensemble (``--ensemble_folds``, first seed) from the cache, members recalibrated
and averaged. Every row scored by ``value_report.RunScores`` (Dice, HD95, ECE / AURC / NLL in the reference ROI,
ρ(mean ROI entropy, 1 − Dice) over cases, and two reference-free case-level flags a user has in deployment:
``rho_all`` ρ(mean entropy over the whole case, 1 − Dice), ``rho_ede`` ρ(expected Dice error, 1 − Dice)); the
rows of several members also ``rho_dis``: ρ(mean ROI label disagreement of the members, 1 − Dice) — the packed
members' map that ``mfs_predict --save_uncertainty`` writes (its s / case includes that map), and nnU-Net's fold
disagreement, its maintainers' recommended uncertainty.

    python benchmarks/value_product.py -c 2d --epochs 10 --iterations_per_epoch 100 --batch_size 32 \\
        --ours_trainer MedFlowSegTrainer_ensemble4 --ensemble_folds 0 1 2 --seeds 0 1 --threads 1 \\
        --work /work/bench_work
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

COLUMNS = ["seed", "model", "dice", "hd95", "ece", "aurc", "nll", "rho", "rho_all", "rho_ede", "rho_dis", "s_per_case"]


PER_CASE = ("dice_fg", "entropy_roi", "entropy_all", "expected_dice_error")


def summary_row(seed, model: str, scores) -> dict:
    """The table's row of ``scores`` (``value_report.RunScores``), with ``per_case`` (Dice and the case-level
    uncertainties of every case, for paired comparisons of the ρ columns) for the JSON."""
    s = scores.summary()
    return {"seed": seed, "model": model, "dice": s["dice_fg"], "hd95": s["hd95"], "ece": s["roi"]["ece"],
            "aurc": s["roi"]["aurc"], "nll": s["roi"]["nll"], "rho": s["spearman_roi"]["rho"],
            "rho_all": s["spearman_all"]["rho"], "rho_ede": s["spearman_ede"]["rho"], "s_per_case": s["s_per_case"],
            "per_case": {c: {k: row[k] for k in PER_CASE} for c, row in scores.cases.items()}}


def score_cases(cases: Sequence[str], predict: Callable[[str], tuple[np.ndarray, float]], inputs: dict,
                labels: Sequence[int], dilation: int):
    """``RunScores`` of ``predict(case) -> (probabilities [C, *S], seconds)`` against the cached references."""
    from value_report import RunScores
    scores = RunScores(labels, dilation)
    for case in cases:
        probs, seconds = predict(case)
        scores.add(case, probs, inputs[case]["ref"], inputs[case]["spacing"], seconds, None)
    return scores


def roi_mean(values: np.ndarray, ref: np.ndarray, dilation: int) -> float:
    """Mean of ``values [*S]`` over the reference ROI (foreground dilated by ``dilation``)."""
    from medflowseg_nn.calibration import reference_roi
    return float(np.asarray(values)[reference_roi(ref, dilation)].mean())


def rho_of(disagreement: dict, scores) -> dict:
    """``{"rho_dis": ρ(mean ROI member disagreement, 1 − Dice), "disagreement": per case}`` over the scored cases;
    ``{}`` without values."""
    from medflowseg_nn.calibration import spearman
    if not disagreement:
        return {}
    cases = list(scores.cases)
    return {"rho_dis": spearman([disagreement[c] for c in cases], [1 - scores.cases[c]["dice_fg"] for c in cases]).rho,
            "disagreement": {c: disagreement[c] for c in cases}}


def ours_rows(seed: int, args, bench, inputs: dict) -> tuple[list[dict], dict]:
    import torch
    from bench_value import make_predictor
    from value_models import train_or_load
    from medflowseg_nn.inference.export import case_arrays
    from medflowseg_nn.temperature import FoldCalibration
    from medflowseg_nn.trainers.member_temperatures import fit_member_calibrations
    trainer, _ = train_or_load("ours", 0, seed, args, bench.plans, bench.dataset_json)
    if sorted(trainer.do_split()[1]) != sorted(bench.splits[0]["val"]):
        raise RuntimeError("the trainer's fold-0 validation cases are not the benchmark's")
    t0 = time.perf_counter()
    calibrations = fit_member_calibrations(trainer, args.roi_dilation, use_mirroring=args.tta)
    if calibrations is None:
        raise SystemExit(f"{args.ours_trainer} {args.flow} is not a packed ensemble (flow_matching.network."
                         f"ensemble_members > 1)")
    fit_s = time.perf_counter() - t0
    predictor = make_predictor(trainer, "ours", args)
    lm = trainer.label_manager
    maps = FoldCalibration(1.0, member_maps=tuple(c.top_label_map for c in calibrations))

    disagreement: dict[str, float] = {}

    def predict(case: str) -> tuple[np.ndarray, float]:  # with member maps: also the member disagreement map
        t = time.perf_counter()
        members_apart = bool(predictor.fold_calibrations[0])
        out = predictor.predict_case(torch.from_numpy(inputs[case]["data"]), with_disagreement=members_apart,
                                     with_mapped=True)
        arrays = case_arrays(out.logits, inputs[case]["props"], predictor.plans_manager,
                             predictor.configuration_manager, lm, disagreement=out.disagreement,
                             with_probabilities=True, mapped=out.mapped)
        if members_apart:
            disagreement[case] = roi_mean(arrays.disagreement, inputs[case]["ref"], args.roi_dilation)
        return arrays.probabilities, time.perf_counter() - t

    rows = []
    for name, calibration in (("ours packed, members tempered (no member maps)", None),
                              ("ours packed, members T + map (the product)", maps)):
        predictor.fold_calibrations = [calibration]
        scores = score_cases(bench.test, predict, inputs, lm.foreground_labels, args.roi_dilation)
        rows.append({**summary_row(seed, name, scores), **rho_of(disagreement, scores)})
    return rows, {"member temperatures": [c.temperature for c in calibrations], "fit seconds": fit_s}


def fold_disagreement(members: Sequence[np.ndarray]) -> np.ndarray:
    """``[*S]`` pairwise label disagreement of the members' argmax (``inference.uncertainty.votes_disagreement``,
    what ``mfs_predict`` writes for a fold ensemble); ``members[i]`` probabilities ``[C, *S]``."""
    import torch
    from medflowseg_nn.inference.uncertainty import votes_disagreement
    c = members[0].shape[0]
    votes = sum(np.moveaxis(np.eye(c, dtype=np.float32)[m.argmax(0)], -1, 0) for m in members)
    return votes_disagreement(torch.from_numpy(votes), len(members)).numpy()


def nnunet_calibrated(fold: int, seed: int, args, bench):
    """nnU-Net's trainer, its cached validation + test probabilities and the T + map fitted on its validation."""
    from value_models import model_tag, train_or_load
    from value_recalibration import fit, fold_probabilities
    trainer, _ = train_or_load("nnunet", fold, seed, args, bench.plans, bench.dataset_json)
    val, probs = fold_probabilities(trainer, "nnunet", fold,
                                    args.work / "value_probs" / model_tag("nnunet", fold, seed, args), args, bench)
    return trainer, probs, fit({c: probs[c] for c in val}, args.roi_dilation)


def nnunet_rows(args, bench, inputs: dict) -> list[dict]:
    from bench_value import make_predictor, probabilities
    rows, ensemble = [], []
    labels = None
    for seed in args.seeds:
        trainer, probs, calibration = nnunet_calibrated(0, seed, args, bench)
        labels, predictor = trainer.label_manager.foreground_labels, make_predictor(trainer, "nnunet", args)

        def predict(case: str) -> tuple[np.ndarray, float]:  # live, timed; scored after the post-hoc T + map
            t = time.perf_counter()
            p, _ = probabilities(predictor, inputs[case]["data"], inputs[case]["props"], args.threads)
            return calibration.probabilities(p), time.perf_counter() - t
        rows.append(summary_row(seed, "nnU-Net single, T + map", score_cases(bench.test, predict, inputs, labels,
                                                                              args.roi_dilation)))
    for fold in args.ensemble_folds:
        _, probs, calibration = nnunet_calibrated(fold, args.seeds[0], args, bench)
        ensemble.append((probs, calibration))
    if len(ensemble) > 1:
        disagreement: dict[str, float] = {}

        def averaged(case: str) -> tuple[np.ndarray, float]:  # and the folds' label disagreement, as mfs_predict
            members = [p[case][0] for p, _ in ensemble]
            disagreement[case] = roi_mean(fold_disagreement(members), inputs[case]["ref"], args.roi_dilation)
            return np.mean([cal.probabilities(p[case][0]) for p, cal in ensemble], 0), float("nan")
        scores = score_cases(bench.test, averaged, inputs, labels, args.roi_dilation)
        rows.append({**summary_row(args.seeds[0], f"nnU-Net {len(ensemble)}-fold ensemble, members T + map", scores),
                     **rho_of(disagreement, scores)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from bench_value import build_parser
    from value_models import prepare, read_case, train_or_load
    parser = build_parser()
    parser.description = "the product's per-member calibration of one packed model, end to end, beside nnU-Net"
    args = parser.parse_args(argv)
    bench = prepare(args)
    trainer, _ = train_or_load("ours", 0, args.seeds[0], args, bench.plans, bench.dataset_json)
    inputs = {}
    for case in bench.test:  # preprocessed once: ours and nnU-Net share the plans' preprocessing
        data, props, ref, spacing, _ = read_case(bench, trainer, case)
        inputs[case] = {"data": data, "props": props, "ref": ref, "spacing": spacing}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": C.machine_info(), "rows": [],
               "fits": {}}
    for seed in args.seeds:
        rows, fit = ours_rows(seed, args, bench, inputs)
        results["rows"] += rows
        results["fits"][f"seed {seed}"] = fit
    results["rows"] += nnunet_rows(args, bench, inputs)
    table = [{**r, **{k: f"{r[k]:.4f}" for k in ("dice", "ece", "aurc", "nll")}, "hd95": f"{r['hd95']:.2f}",
              **{k: f"{r[k]:.2f}" if r.get(k) is not None else "" for k in ("rho", "rho_all", "rho_ede", "rho_dis")},
              "s_per_case": f"{r['s_per_case']:.2f}"} for r in results["rows"]]
    print(C.markdown_table(table, COLUMNS))
    print(results["fits"])
    C.write_json(args.out_dir / f"value_product_{args.budget_tag}.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
