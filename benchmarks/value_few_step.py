"""Few-step sampling of ONE trained model, setting beside setting (issue #9: does the few-step path refine?).

For each of ``--seeds`` the fold-0 model of ``value_models.py`` / ``bench_value.py`` (same flags, same cache; a
missing one is trained) predicts the held-out test cases with every sampler setting: one Euler step, Euler N = 2 /
4 and Heun N = 2, each also with the path mean (``SolverConfig.path_mean``: the mean of the steps' clean
estimates instead of the last one; no extra network call). Scored as bench_value scores (``value_report.RunScores``:
Dice, HD95, ECE / Brier / NLL / AURC over all voxels and the reference ROI, ρ(entropy, 1 − Dice)), TTA as
``--tta``, no temperature (the settings of one model are compared raw). Prints the table over seeds
(mean (min–max)) and the per-seed Dice difference of each setting to one step; writes JSON.

    python benchmarks/value_few_step.py -c 2d --epochs 10 --iterations_per_epoch 100 --batch_size 32 \
        --seeds 0 1 2 3 --threads 2 --work /work/bench_work
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_value as BV  # noqa: E402
import common as C  # noqa: E402
import value_models as VM  # noqa: E402
from value_report import RunScores, tables  # noqa: E402

logger = logging.getLogger("benchmarks.value")

#: (row, solver, steps, path mean), cheapest first
SETTINGS = [("1 step", "euler", 1, False), ("Euler N=2", "euler", 2, False), ("Euler N=2 path mean", "euler", 2, True),
            ("Euler N=4", "euler", 4, False), ("Euler N=4 path mean", "euler", 4, True),
            ("Heun N=2", "heun", 2, False), ("Heun N=2 path mean", "heun", 2, True)]


def build_parser() -> argparse.ArgumentParser:
    p = BV.build_parser()
    p.description = __doc__
    p.add_argument("--settings", nargs="+", default=None, metavar="ROW",
                   help=f"rows to run (default all): {', '.join(s[0] for s in SETTINGS)}")
    return p


def score_seed(bench: VM.BenchSetup, args: argparse.Namespace, seed: int,
               settings: Sequence[tuple[str, str, int, bool]]) -> dict[str, dict]:
    """Every setting's ``RunScores.summary()`` for the fold-0 model of ``seed`` on the test cases."""
    trainer, _ = VM.train_or_load("ours", 0, seed, args, bench.plans, bench.dataset_json)
    labels = list(trainer.label_manager.foreground_labels)
    predictors = {row: BV.make_predictor(trainer, "ours", args, solver, steps, path_mean=mean)
                  for row, solver, steps, mean in settings}
    scores = {row: RunScores(labels, args.roi_dilation) for row in predictors}
    for i, case in enumerate(bench.test):
        data, props, ref, spacing, _ = VM.read_case(bench, trainer, case)
        for row, predictor in predictors.items():
            probs, seconds = BV.probabilities(predictor, data, props, args.threads)
            scores[row].add(case, probs, ref, spacing, seconds, None)
        logger.info("seed %d: %d/%d %s", seed, i + 1, len(bench.test), case)
    return {row: s.summary() for row, s in scores.items()}


def dice_differences(per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown: per setting, its Dice minus one step's, per seed and the mean."""
    seeds = sorted(per_seed)
    rows = []
    for row in per_seed[seeds[0]]:
        diffs = [per_seed[s][row]["dice_fg"] - per_seed[s]["1 step"]["dice_fg"] for s in seeds]
        rows.append({"setting": row, **{f"seed {s}": f"{d:+.4f}" for s, d in zip(seeds, diffs)},
                     "mean": f"{np.mean(diffs):+.4f}", "≥ 1 step": f"{sum(d >= 0 for d in diffs)}/{len(diffs)}"})
    return C.markdown_table(rows, list(rows[0]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = [s for s in SETTINGS if args.settings is None or s[0] in args.settings]
    if not settings or settings[0][0] != "1 step":
        raise SystemExit("--settings must include '1 step' (the reference of the differences)")
    t0 = time.perf_counter()
    bench = VM.prepare(args)
    per_seed = {seed: score_seed(bench, args, seed, settings) for seed in args.seeds}
    results = {row: [per_seed[s][row] for s in args.seeds] for row, *_ in settings}
    seg, cal = tables(results)
    diffs = dice_differences(per_seed)
    print(seg, cal, diffs, sep="\n\n")
    out = args.out_dir / f"value_few_step_{args.budget_tag}.json"
    C.write_json(out, {"machine": C.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                       "test_cases": bench.test, "results": results, "seconds": time.perf_counter() - t0})
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
