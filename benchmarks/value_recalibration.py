"""Post-hoc recalibration on the issue-#9 protocol, for nnU-Net's models, its fold ensemble and ours in one run:
the fold temperature T and the top-label isotonic map after it — what ``mfs_predict`` applies
(:class:`medflowseg_nn.temperature.FoldCalibration`, fitted as ``fit_calibration_on_folder`` fits it).

Every model of bench_value's cache (``value_models.train_all`` with bench_value's flags; missing ones are trained)
predicts the validation cases of its fold and the held-out test cases once (TTA off, one step for ours); the
probabilities are kept as float16 in ``WORK/value_probs/{model tag}/CASE.npz``. Per model: T fitted on its fold's
validation cases (NLL in the reference ROI), the map on the tempered probabilities of the same voxels; the test
cases scored raw, + T and + T + map (ROI = reference foreground dilated by ``--roi_dilation``). A fold ensemble
(``--ensemble_folds`` / ``--ours_ensemble_folds``, first seed, at ``--ensemble_epochs`` when given) averages its
members' probabilities after each member's own recalibration, as ``mfs_predict`` averages folds. Prints a table,
writes JSON.

    python benchmarks/value_recalibration.py -c 2d --epochs 10 --iterations_per_epoch 100 --batch_size 32 \\
        --ensemble_folds 0 1 2 --seeds 0 1 --work /work/bench_work [--ours_trainer MedFlowSegTrainer_noDice]
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.value_recalibration")
STAGES = ("raw", "+ T", "+ T + map")


def model_probabilities(trainer, method: str, cases: Sequence[str], folder: Path, args, read_case) -> dict:
    """``{case: (probabilities [C, *S] float32, reference [*S])}``, predicted once and cached in ``folder``."""
    from bench_value import make_predictor, probabilities
    folder.mkdir(parents=True, exist_ok=True)
    predictor, out = None, {}
    for case in cases:
        path = folder / f"{case}.npz"
        if not path.is_file():
            data, props, ref = read_case(case)
            predictor = predictor or make_predictor(trainer, method, args)
            probs, _ = probabilities(predictor, data, props, args.threads)
            tmp = folder / f"{case}.tmp.npz"  # renamed when complete: a killed run leaves no truncated file
            np.savez_compressed(tmp, probabilities=probs.astype(np.float16), ref=ref.astype(np.int16))
            os.replace(tmp, path)
        saved = np.load(path)
        out[case] = (saved["probabilities"].astype(np.float32), saved["ref"].astype(np.int64))
    return out


def fold_probabilities(trainer, method: str, fold: int, folder: Path, args, bench) -> tuple[list[str], dict]:
    """The fold's validation cases (its first ``--temperature_cases``) and :func:`model_probabilities` of them and
    of the held-out test cases, cached in ``folder``, each case read with ``trainer``'s preprocessing."""
    from value_models import read_case
    val = sorted(bench.splits[fold]["val"])[: args.temperature_cases]
    return val, model_probabilities(trainer, method, val + list(bench.test), folder, args,
                                    lambda case: read_case(bench, trainer, case)[:3])


def fit(validation: dict, dilation: int):
    """:class:`FoldCalibration` (T, then the map) fitted on the validation cases' ROI voxels."""
    from medflowseg_nn.calibration import reference_roi
    from medflowseg_nn.temperature import fit_calibration
    refs = [r for _, r in validation.values()]
    return fit_calibration([p for p, _ in validation.values()], refs, [reference_roi(r, dilation) for r in refs])


def stage_fn(calibration, stage: str) -> Callable[[np.ndarray], np.ndarray]:
    from medflowseg_nn.temperature import FoldCalibration
    if stage == "raw":
        return lambda p: p
    return FoldCalibration(calibration.temperature, None).probabilities if stage == "+ T" \
        else calibration.probabilities


def score(test: Sequence[str], probabilities: Callable[[str], tuple[np.ndarray, np.ndarray]], dilation: int) -> dict:
    from medflowseg_nn.calibration import CalibrationAccumulator, reference_roi
    acc = CalibrationAccumulator()
    for case in test:
        p, ref = probabilities(case)
        acc.update(p, ref, reference_roi(ref, dilation))
    d = acc.result().to_dict()
    return {k: d[k] for k in ("ece", "aurc", "nll", "brier")}


def ensemble_score(test: Sequence[str], calibrated: dict, recalibrate: dict, dilation: int) -> dict:
    """:func:`score` of a fold ensemble: the mean over the members (``recalibrate``: member key → its
    probabilities' recalibration) of their recalibrated probabilities, as ``mfs_predict`` averages folds."""
    members = list(recalibrate)

    def averaged(case: str):
        mean = np.mean([recalibrate[m](calibrated[m][0][case][0]) for m in members], 0)
        return mean, calibrated[members[0]][0][case][1]
    return score(test, averaged, dilation)


def pooled_rows(test: Sequence[str], calibrated: dict, validation: dict, args) -> list[dict]:
    """The "+ pooled T + map" rows: ``calibrated`` / ``validation``: model key → (test + validation probabilities,
    own calibration) / its fold's validation cases' probabilities."""
    from value_models import ensemble_folds, member_key
    rows = []
    for method in ("nnunet", "ours"):
        members = [member_key(method, f, args) for f in ensemble_folds(method, args)]
        others = [m for m in members if not re.search(r"_f0_s\d+$", m)]
        pools = {k: [k, *others] for k in calibrated if re.fullmatch(rf"{method}_f0_s\d+", k)} if members else {}
        for key, pool in pools.items():
            pooled = fit({c: v for m in pool for c, v in validation[m].items()}, args.roi_dilation)
            probs = calibrated[key][0]
            scores = score(test, lambda c: (pooled.probabilities(probs[c][0]), probs[c][1]), args.roi_dilation)
            rows.append({"model": key, "stage": "+ pooled T + map", "T": pooled.temperature, **scores})
        if members:
            pooled = fit({c: v for m in members for c, v in validation[m].items()}, args.roi_dilation)
            rows.append({"model": f"{method} ensemble {'+'.join(members)}", "stage": "+ pooled T + map",
                         "T": pooled.temperature, **ensemble_score(
                             test, calibrated, {m: pooled.probabilities for m in members}, args.roi_dilation)})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from bench_value import build_parser
    from value_models import ensemble_folds, member_args, member_key, model_tag, prepare, train_all
    parser = build_parser()
    parser.description = "fold temperature and top-label map: nnU-Net's models, its fold ensemble and ours"
    args = parser.parse_args(argv)
    bench = prepare(args)
    members = member_args(args)
    models = train_all(args, bench.plans, bench.dataset_json)
    calibrated, validation = {}, {}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": C.machine_info(), "rows": []}
    for key, (trainer, _) in models.items():
        method, apart, fold, seed = re.fullmatch(r"(nnunet|ours)(_members)?_f(\d+)_s(\d+)", key).groups()
        tag = model_tag(method, int(fold), int(seed), members if apart else args)
        val, probs = fold_probabilities(trainer, method, int(fold), args.work / "value_probs" / tag, args, bench)
        validation[key] = {c: probs[c] for c in val}
        calibration = fit(validation[key], args.roi_dilation)
        calibrated[key] = (probs, calibration)
        for stage in STAGES:
            f = stage_fn(calibration, stage)
            row = {"model": key, "stage": stage, "T": calibration.temperature,
                   **score(bench.test, lambda c: (f(probs[c][0]), probs[c][1]), args.roi_dilation)}
            results["rows"].append(row)
    for method in ("nnunet", "ours"):
        keys = [member_key(method, f, args) for f in ensemble_folds(method, args)]
        for stage in STAGES if keys else ():
            fns = {m: stage_fn(calibrated[m][1], stage) for m in keys}
            results["rows"].append({"model": f"{method} ensemble {'+'.join(keys)}", "stage": stage,
                                    **ensemble_score(bench.test, calibrated, fns, args.roi_dilation)})
    results["rows"] += pooled_rows(bench.test, calibrated, validation, args)
    table = [{**r, **{k: f"{r[k]:.4f}" for k in ("ece", "aurc", "nll", "brier")},
              "T": f"{r['T']:.2f}" if "T" in r else ""} for r in results["rows"]]
    print(C.markdown_table(table, ["model", "stage", "T", "ece", "aurc", "nll", "brier"]))
    C.write_json(args.out_dir / f"value_recalibration_{args.budget_tag}.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
