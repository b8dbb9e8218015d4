"""A packed ensemble's members (``--ours_trainer MedFlowSegTrainer_ensemble4``) against its average and nnU-Net's
models, on the issue-#9 protocol: which recalibration brings one model the fold ensemble's calibration.

For each seed's fold-0 packed model (``value_models`` cache; missing ones are trained): every member alone and the
packed model predict the fold-0 validation and the held-out test cases once (TTA off, one step; float16 caches in
``WORK/value_probs/{tag}_member{i}`` beside ``value_recalibration``'s ``{tag}``). Rows, test cases, ROI = the
reference foreground dilated by ``--roi_dilation`` (Dice = mean foreground Dice of the argmax):

* each member alone: raw, + its own T, + T + top-label map (fitted on the validation cases);
* the packed model as trained (the members' plain average): raw, + one T, + T + map on the average;
* each member tempered by its own T, the tempered probabilities averaged — **the product**'s output (stage "raw":
  ``trainers.member_temperatures``, no fold step after it) — and a fold T + map fitted again on that average;
* each member T + map, then averaged (how ``value_recalibration`` scores a fold ensemble).

Member disagreement: the share of ROI voxels where two models' argmax differ, averaged over pairs — the packed
members, and nnU-Net's fold models (``--ensemble_folds``, first seed) when ``value_recalibration`` cached them.

    python benchmarks/value_members.py -c 2d --epochs 10 --iterations_per_epoch 100 --batch_size 32 \\
        --ours_trainer MedFlowSegTrainer_ensemble4 --ensemble_folds 0 1 2 --seeds 0 1 --work /work/bench_work
"""
from __future__ import annotations

import itertools
import os
from typing import Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

STAGES = ("raw", "+ T", "+ T + map")


def stage_rows(name: str, probs: dict, val: Sequence[str], test: Sequence[str], dilation: int) -> list[dict]:
    """The three stages of one set of probabilities ``{case: (p, ref)}``: T + map fitted on ``val``."""
    from medflowseg_nn.calibration_folder import argmax_foreground_dice
    from value_recalibration import fit, score, stage_fn
    calibration = fit({c: probs[c] for c in val}, dilation)
    dice = float(np.mean([argmax_foreground_dice(*probs[c]) for c in test]))
    return [{"model": name, "stage": stage, "T": calibration.temperature, "dice": dice,
             **score(test, lambda c, f=stage_fn(calibration, stage): (f(probs[c][0]), probs[c][1]), dilation)}
            for stage in STAGES]


def disagreement(models: Sequence[dict], test: Sequence[str], dilation: int) -> float:
    """Mean over model pairs and test cases of the ROI share where the two argmaxes differ."""
    from medflowseg_nn.calibration import reference_roi
    rois = {c: reference_roi(models[0][c][1], dilation) for c in test}
    labels = [{c: m[c][0].argmax(0) for c in test} for m in models]
    return float(np.mean([np.mean([np.mean((a[c] != b[c])[rois[c]]) for c in test])
                          for a, b in itertools.combinations(labels, 2)]))


def seed_rows(seed: int, args, bench) -> tuple[list[dict], dict]:
    from medflowseg_nn.temperature import apply_temperature
    from value_models import model_tag, train_or_load
    from value_recalibration import fit, fold_probabilities, score, stage_fn
    trainer, _ = train_or_load("ours", 0, seed, args, bench.plans, bench.dataset_json)
    packed, tag = trainer.network, model_tag("ours", 0, seed, args)
    val, whole = fold_probabilities(trainer, "ours", 0, args.work / "value_probs" / tag, args, bench)
    cases, test, d = val + list(bench.test), list(bench.test), args.roi_dilation
    members = []
    for i, member in enumerate(packed.members):
        trainer.network = member
        members.append(fold_probabilities(trainer, "ours", 0, args.work / "value_probs" / f"{tag}_member{i}", args,
                                          bench)[1])
    trainer.network = packed
    rows = [r for i, m in enumerate(members) for r in stage_rows(f"member {i}", m, val, test, d)]
    rows += stage_rows("packed, as trained (plain average)", whole, val, test, d)
    own = [fit({c: m[c] for c in val}, d) for m in members]
    tempered = {c: (np.mean([apply_temperature(m[c][0], cal.temperature) for m, cal in zip(members, own)], 0),
                    whole[c][1]) for c in cases}
    rows += stage_rows("members tempered, averaged (raw = the product), fold T + map", tempered, val, test, d)
    for stage in STAGES:
        fns = [stage_fn(cal, stage) for cal in own]
        rows.append({"model": "members each T + map, averaged", "stage": stage, **score(
            test, lambda c: (np.mean([f(m[c][0]) for f, m in zip(fns, members)], 0), whole[c][1]), d)})
    spread = {"member temperatures": [cal.temperature for cal in own], "packed members": disagreement(members, test, d)}
    return [{"seed": seed, **r} for r in rows], spread


def nnunet_disagreement(args, bench) -> Optional[float]:
    from value_models import model_tag
    folders = [args.work / "value_probs" / model_tag("nnunet", f, args.seeds[0], args) for f in args.ensemble_folds]
    if len(folders) < 2 or not all(all((f / f"{c}.npz").is_file() for c in bench.test) for f in folders):
        return None
    models = [{c: (np.load(f / f"{c}.npz")["probabilities"].astype(np.float32),
                   np.load(f / f"{c}.npz")["ref"].astype(np.int64)) for c in bench.test} for f in folders]
    return disagreement(models, list(bench.test), args.roi_dilation)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from bench_value import build_parser
    from value_models import prepare
    parser = build_parser()
    parser.description = "a packed ensemble's members, its average, the product's member temperatures"
    args = parser.parse_args(argv)
    bench = prepare(args)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": C.machine_info(), "rows": [],
               "spread": {}}
    for seed in args.seeds:
        rows, spread = seed_rows(seed, args, bench)
        results["rows"] += rows
        results["spread"][f"seed {seed}"] = spread
    results["spread"]["nnunet fold models"] = nnunet_disagreement(args, bench)
    table = [{**r, **{k: f"{r[k]:.4f}" for k in ("dice", "ece", "aurc", "nll", "brier") if k in r},
              "T": f"{r['T']:.2f}" if "T" in r else ""} for r in results["rows"]]
    print(C.markdown_table(table, ["seed", "model", "stage", "T", "dice", "ece", "aurc", "nll", "brier"]))
    print(results["spread"])
    C.write_json(args.out_dir / f"value_members_{args.budget_tag}.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
