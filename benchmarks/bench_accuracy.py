"""Dice / HD95 per class: MedFlowSegTrainer vs nnUNetTrainer, same plans, same budget, fold 0.

Both trainers are trained on the same MedFlowSegPlans (nnUNetTrainer on the PlainConvUNet copy of them, see
``common.plain_unet_plans``) for ``--epochs`` epochs of ``--iterations_per_epoch`` iterations (trainer
attributes set on the instance; nnU-Net's defaults are 1000 x 250). Then the fold's validation cases are
predicted from the raw images with each method's predictor (ours: MedFlowSegPredictor, ``--steps`` Euler steps,
default 1; nnU-Net: nnUNetPredictor), exported in the raw geometry and evaluated against the raw labels with
``medflowseg_nn.evaluation.evaluate_folder`` (what ``mfs_evaluate`` runs). TTA (mirroring) is off by default to
keep CPU time bounded (``--tta`` turns it on for both).

    python benchmarks/bench_accuracy.py --epochs 1 --iterations_per_epoch 12          # tiny CPU budget
    python benchmarks/bench_accuracy.py --epochs 100 --iterations_per_epoch 250 -device cuda --tta
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.accuracy")
METHODS = ("ours", "nnunet")


def train(method: str, args: argparse.Namespace, plans: dict, dataset_json: dict):
    import numpy as np
    import torch
    trainer = C.trainer_for(method, plans, dataset_json, args.configuration, args.fold, torch.device(args.device))
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations
    if hasattr(trainer, "val_multistep_batches"):  # ours: the extra multi-step pseudo Dice costs 4 forward passes
        trainer.val_multistep_batches = 0
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    trainer.run_training()
    return trainer, time.perf_counter() - t0


def predict_cases(trainer, method: str, cases: Sequence[str], out_dir: Path, args: argparse.Namespace) -> float:
    """Predict raw images of ``cases`` with the trained network in memory; returns seconds."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from medflowseg_nn.inference.predictor import MedFlowSegPredictor

    trainer.set_deep_supervision_enabled(False)
    network = trainer.network
    network.eval()
    kwargs = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta, perform_everything_on_device=True,
                  device=torch.device(args.device), verbose=False, allow_tqdm=False)
    predictor = MedFlowSegPredictor(**kwargs, steps=args.steps) if method == "ours" else nnUNetPredictor(**kwargs)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    raw = C.shared_data_dir() / trainer.plans_manager.dataset_name / "imagesTr"
    ending = trainer.dataset_json["file_ending"]
    n_ch = len(trainer.dataset_json["channel_names"])
    out_dir.mkdir(parents=True, exist_ok=True)
    pp = trainer.configuration_manager.preprocessor_class(verbose=False)
    t0 = time.perf_counter()
    for case in cases:
        files = [str(raw / f"{case}_{i:04d}{ending}") for i in range(n_ch)]
        data, _, props = pp.run_case(files, None, trainer.plans_manager, trainer.configuration_manager,
                                     trainer.dataset_json)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        export_prediction_from_logits(logits, props, trainer.configuration_manager, trainer.plans_manager,
                                      trainer.dataset_json, str(out_dir / case))
    return time.perf_counter() - t0


def reference_folder(name: str, cases: Sequence[str], folder: Path, ending: str) -> Path:
    """Symlinks to the raw labels of exactly these cases (evaluate_folder wants matching sets)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    for case in cases:
        (folder / f"{case}{ending}").symlink_to((C.shared_data_dir() / name / "labelsTr" / f"{case}{ending}").resolve())
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4", help="dataset id or name (default 4 = Dataset004_Hippocampus)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--iterations_per_epoch", type=int, default=250)
    p.add_argument("--val_iterations", type=int, default=2, help="validation batches per epoch (pseudo Dice)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=1, help="Euler steps of our predictor (default 1)")
    p.add_argument("--tta", action="store_true", help="mirroring at prediction, both methods (default off)")
    p.add_argument("--max_val_cases", type=int, default=None, help="predict only the first K validation cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all cores)")
    C.add_output_args(p, "bench_accuracy.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    paths = C.setup_env(args.work)
    import torch
    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from medflowseg_nn.evaluation import evaluate_folder

    name = C.resolve_dataset_name(args.d)
    C.ensure_planned(name, [args.configuration], preprocess=True)
    plans, dataset_json = C.load_plans(name)
    info = C.machine_info()
    ending = dataset_json["file_ending"]
    run_dir = paths["nnUNet_results"] / "bench_accuracy" / f"{args.configuration}_fold{args.fold}"
    rows, details = [], {}
    for method in args.methods:
        trainer, train_s = train(method, args, plans, dataset_json)
        cases = sorted(trainer.do_split()[1])[: args.max_val_cases]
        pred_dir = run_dir / f"pred_{method}"
        for f in pred_dir.glob(f"*{ending}"):
            f.unlink()
        predict_s = predict_cases(trainer, method, cases, pred_dir, args)
        ref_dir = reference_folder(name, cases, run_dir / "ref", ending)
        metrics = evaluate_folder(str(ref_dir), str(pred_dir), file_ending=ending, num_processes=2,
                                  output_file=str(run_dir / f"summary_{method}.json"))
        pseudo = trainer.logger.get_value("dice_per_class_or_region", step=-1)
        details[method] = {"trainer": type(trainer).__name__, "network": type(trainer.network).__name__,
                           "train_s": train_s, "predict_s": predict_s, "val_cases": cases,
                           "final_train_loss": float(trainer.logger.get_value("train_losses", step=-1)),
                           "pseudo_dice": [float(x) for x in pseudo], "metrics": metrics,
                           "checkpoint": str(Path(trainer.output_folder) / "checkpoint_final.pth")}
        for key, m in metrics["mean"].items():
            rows.append({"method": method, "class": key, "Dice": m["Dice"], "HD95": m["HD95"],
                         "HD95_n_inf": m["HD95_n_inf"], "NSD": m["NSD"], "cases": len(cases),
                         "train_s": train_s, "predict_s": predict_s})
        fg = metrics["foreground_mean"]
        rows.append({"method": method, "class": "mean", "Dice": fg["Dice"], "HD95": fg["HD95"],
                     "HD95_n_inf": fg["HD95_n_inf"], "NSD": fg["NSD"], "cases": len(cases), "train_s": train_s,
                     "predict_s": predict_s})
        del trainer
    table = C.markdown_table(rows, ("method", "class", "Dice", "HD95", "HD95_n_inf", "NSD", "cases", "train_s",
                                    "predict_s"))
    budget = f"{args.epochs} epoch(s) x {args.iterations_per_epoch} iterations"
    print(f"\n{name} {args.configuration} fold {args.fold}, {budget}, TTA {'on' if args.tta else 'off'}, "
          f"ours {args.steps} step(s); mean over validation cases (HD95 mm, non-finite excluded and counted)\n{table}")
    C.write_json(args.out, {"benchmark": "accuracy", "machine": info, "args": {k: str(v) for k, v in
                                                                                vars(args).items()},
                            "budget": budget, "details": details, "summary": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
