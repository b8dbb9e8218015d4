"""``mfs_demo``: the whole pipeline on a generated dataset, no external data needed.

Generates a small synthetic 3D dataset (nested ellipsoids, 2 foreground labels, noise and bias field), then runs
``mfs_plan_and_preprocess``, ``mfs_train`` (``MedFlowSegTrainer_demo``: a few short epochs), ``mfs_predict`` on
held-out cases and ``mfs_evaluate``, and prints Dice per class. About 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, pick_device, setup_logging

DEMO_ID = 990


def run_demo(output_dir: str | Path, device: str | None = None, num_train: int = 16, num_test: int = 4,
             shape: Sequence[int] = (24, 28, 24), trainer: str = "MedFlowSegTrainer_demo", steps: int = 1,
             seed: int = 0) -> dict:
    """Run the demo inside ``output_dir`` (its own nnUNet_raw / _preprocessed / _results) and return the
    evaluation summary."""
    from medflowseg_nn.cli.plan_and_preprocess import plan_and_preprocess
    from medflowseg_nn.inference.runner import PredictionSettings, predict_folder
    from medflowseg_nn.cli.train import run_training
    from medflowseg_nn.evaluation import evaluate_folder
    from medflowseg_nn.synthetic import make_synthetic_dataset

    out = Path(output_dir).resolve()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (out / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(out / name)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    configuration = "3d_fullres" if len(shape) == 3 else "2d"
    timings = {}
    t0 = time.time()
    raw = make_synthetic_dataset(out / "nnUNet_raw", DEMO_ID, "Synthetic", num_train, num_test, shape, seed=seed)
    plan_and_preprocess(dataset_ids=[str(DEMO_ID)], configurations=[configuration], num_processes=[2])
    timings["plan_and_preprocess_s"] = time.time() - t0
    t0 = time.time()
    torch_device = pick_device(device)
    run_training(dataset=str(DEMO_ID), configuration=configuration, fold=0, trainer=trainer, device=torch_device)
    timings["train_s"] = time.time() - t0
    t0 = time.time()
    model = out / "nnUNet_results" / raw.name / f"{trainer}__MedFlowSegPlans__{configuration}"
    pred = out / "predictions"
    predict_folder(input_folder=str(raw / "imagesTs"), output_folder=str(pred), model_folder=str(model),
                   settings=PredictionSettings(folds=(0,), device=torch_device, steps=steps))
    timings["predict_s"] = time.time() - t0
    summary = evaluate_folder(str(raw / "labelsTs"), str(pred), labels=[1, 2],
                              output_file=str(out / "summary.json"))
    summary["timings"] = timings
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_demo", description=__doc__)
    p.add_argument("-o", "--output_dir", default="mfs_demo_output", help="working folder (default ./mfs_demo_output)")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--num_train", type=int, default=16)
    p.add_argument("--num_test", type=int, default=4)
    p.add_argument("--shape", type=int, nargs="+", default=[24, 28, 24], help="volume shape (2 numbers = 2D)")
    p.add_argument("-tr", default="MedFlowSegTrainer_demo", help="trainer (default MedFlowSegTrainer_demo)")
    p.add_argument("--steps", type=int, default=1, help="ODE steps at prediction")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    summary = run_demo(output_dir=args.output_dir, device=args.device, num_train=args.num_train,
                       num_test=args.num_test, shape=args.shape, trainer=args.tr, steps=args.steps)
    print("\nMedFlowSeg-nn demo: Dice on held-out synthetic cases")
    print(f"{'class':<10}{'Dice':>8}{'HD95 mm':>10}")
    for label, name in (("1", "outer"), ("2", "core")):
        m = summary["mean"][label]
        hd = "-" if m["HD95"] is None else f"{m['HD95']:.2f}"
        print(f"{label + ' ' + name:<10}{m['Dice']:>8.3f}{hd:>10}")
    t = summary["timings"]
    print(f"time: plan+preprocess {t['plan_and_preprocess_s']:.0f}s, train {t['train_s']:.0f}s, "
          f"predict {t['predict_s']:.0f}s; results in {Path(args.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
