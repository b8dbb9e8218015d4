"""Train (or load from the cache) the models of ``bench_value.py``, one per process if wanted.

``bench_value.py`` trains its models one after the other in one process. On a machine with two cores two
trainings can run side by side instead, each in its own process with one torch thread: run this script once per
model with bench_value's own flags, then ``bench_value.py`` with the same flags finds every model in the cache
(``WORK/value_models/{trainer}_f{fold}_s{seed}_{budget}.pth``) and only predicts.

    python benchmarks/value_models.py nnunet 0 --fold 0 -c 2d --epochs 5 --iterations_per_epoch 100 \
        --batch_size 32 --threads 1 --work /work/bench_work &
    python benchmarks/value_models.py ours 0 --fold 0 -c 2d ... (the same flags) &
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.value")


def get_trainer(method: str, fold: int, args: argparse.Namespace, plans: dict, dataset_json: dict):
    import torch
    device = torch.device(args.device)
    if method == "nnunet" or args.ours_trainer == "MedFlowSegTrainer":
        return C.trainer_for(method, plans, dataset_json, args.configuration, fold, device)
    from medflowseg_nn.plugins import get_trainer_class
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return get_trainer_class(args.ours_trainer)(plans=plans, configuration=args.configuration, fold=fold,
                                                dataset_json=dataset_json, device=device)


def budget_tag(args: argparse.Namespace) -> str:
    """``e{epochs}i{iterations}b{batch}``, with ``_{configuration}`` unless 3d_fullres (the cache names of
    3d_fullres models written before the configuration was part of the tag stay valid)."""
    tag = f"e{args.epochs}i{args.iterations_per_epoch}b{args.batch_size}"
    return tag if args.configuration == "3d_fullres" else f"{tag}_{args.configuration}"


def parse_flow_overrides(items: Sequence[str]) -> dict:
    """``["network.time_scaled_x_t=true", "aux_on_own_estimate=true"]`` → the nested dict they set in the plans'
    ``flow_matching`` block (values are JSON: ``true``, ``0.5``, ``"uniform"``; a bare word is a string)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--flow takes KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = parsed
    return out


def load_bench_plans(name: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """The plans every benchmark model trains on: the dataset's MedFlowSegPlans with ``batch_size`` set to
    ``--batch_size`` and the ``--flow`` overrides written into the ``flow_matching`` block (checked by
    ``FlowMatchingConfig``: an unknown key stops here, before any training). nnU-Net's models ignore the block."""
    from medflowseg_nn.config import PLANS_KEY, FlowMatchingConfig
    plans, dataset_json = C.load_plans(name)
    plans["configurations"][args.configuration]["batch_size"] = args.batch_size
    overrides = parse_flow_overrides(args.flow)
    if overrides:
        block = plans.setdefault(PLANS_KEY, {})
        block.setdefault("network", {}).update(overrides.pop("network", {}))
        block.update(overrides)
        FlowMatchingConfig.from_plans(plans)
    return plans, dataset_json


def model_tag(method: str, fold: int, seed: int, args: argparse.Namespace) -> str:
    """Cache name of one model: the trainer (ours: plus the ``--flow`` overrides), fold, seed and budget."""
    if method == "nnunet":
        return f"nnunet_f{fold}_s{seed}_{args.budget_tag}"
    flow = "".join(f"_{item}" for item in sorted(args.flow))
    return f"{args.ours_trainer}{flow}_f{fold}_s{seed}_{args.budget_tag}".replace("/", "-").replace(" ", "")


def train_or_load(method: str, fold: int, seed: int, args: argparse.Namespace, plans: dict, dataset_json: dict):
    """Trained trainer (network in memory) and training seconds; cached as a state dict per (method, fold, seed)."""
    import torch
    tag = model_tag(method, fold, seed, args)
    cache = args.work / "value_models" / f"{tag}.pth"
    trainer = get_trainer(method, fold, args, plans, dataset_json)
    trainer.num_epochs, trainer.num_iterations_per_epoch = args.epochs, args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations
    if hasattr(trainer, "val_multistep_batches"):
        trainer.val_multistep_batches = 0
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=False)
        trainer.initialize()
        trainer.network.load_state_dict(saved["state_dict"])
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # the mirror axes a training sets
        logger.info("%s: loaded cached weights %s", tag, cache)
        return trainer, saved["train_s"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    t0 = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": trainer.network.state_dict(), "train_s": train_s}, cache)
    logger.info("%s: trained in %.0f s", tag, train_s)
    return trainer, train_s


def members_apart(args: argparse.Namespace) -> bool:
    """Whether the fold-ensemble members train for their own ``--ensemble_epochs`` (≠ ``--epochs``)."""
    return args.ensemble_epochs not in (None, args.epochs)


def ensemble_folds(method: str, args: argparse.Namespace) -> list[int]:
    """The folds of ``method``'s fold ensemble (``--ensemble_folds`` / ``--ours_ensemble_folds``); none when fewer
    than two are given: an "ensemble" of one fold is the single model."""
    folds = args.ensemble_folds if method == "nnunet" else args.ours_ensemble_folds
    return list(folds) if len(folds) > 1 else []


def member_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the fold-ensemble members' budget: ``--ensemble_epochs`` (default ``--epochs``) and its tag."""
    members = copy.copy(args)
    members.epochs = args.ensemble_epochs or args.epochs
    members.budget_tag = budget_tag(members)
    return members


def member_key(method: str, fold: int, args: argparse.Namespace) -> str:
    """Model (and run) key of the fold-ensemble member of ``fold`` (first seed). Fold 0's member is the fold-0
    single model of the first seed, ``{method}_f0_s{seed}``, unless ``members_apart``: then every member is its
    own model, ``{method}_members_f{fold}_s{seed}``."""
    return f"{method}{'_members' if members_apart(args) else ''}_f{fold}_s{args.seeds[0]}"


def train_all(args: argparse.Namespace, plans: dict, dataset_json: dict) -> dict[str, tuple[Any, float]]:
    """Every model of a bench_value run (trained, or loaded from the cache), key → (trainer, training seconds):
    ``{method}_f0_s{seed}`` for each of ``--seeds``, and the fold-ensemble members (first seed) of
    ``--ensemble_folds`` / ``--ours_ensemble_folds`` under ``member_key`` — at ``--ensemble_epochs`` when given, so
    that one model trained for the ensemble's total iterations can be set beside the ensemble."""
    members = member_args(args)
    models: dict[str, tuple[Any, float]] = {}
    for method in ("nnunet", "ours"):
        for seed in args.seeds:
            models[f"{method}_f0_s{seed}"] = train_or_load(method, 0, seed, args, plans, dataset_json)
        for fold in ensemble_folds(method, args):
            key = member_key(method, fold, args)
            if key not in models:
                models[key] = train_or_load(method, fold, args.seeds[0], members, plans, dataset_json)
    return models


@dataclass(frozen=True)
class BenchSetup:
    """The dataset every issue-#9 benchmark script works on: its name, preprocessed folder, plans (with
    ``--batch_size`` and ``--flow``), dataset.json, held-out test cases (the last ``--n_test``, cut to
    ``--max_test_cases``) and the cross-validation splits of the rest."""

    name: str
    folder: Path
    plans: dict
    dataset_json: dict
    test: list
    splits: list


def read_case(bench: BenchSetup, trainer, case: str) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray, Any]:
    """One case of ``bench``'s raw dataset as the benchmarks score it: the image preprocessed with ``trainer``'s
    plans (``data``, its ``properties``), the reference ``[*S]`` int64 in SimpleITK's array layout (as
    ``evaluation._read``: (z, y, x)), its spacing in that order and the SimpleITK image."""
    import SimpleITK as sitk
    raw, ending = C.shared_data_dir() / bench.name, bench.dataset_json["file_ending"]
    files = [str(raw / "imagesTr" / f"{case}_{i:04d}{ending}") for i in range(len(bench.dataset_json["channel_names"]))]
    pm, cm = trainer.plans_manager, trainer.configuration_manager
    data, _, props = cm.preprocessor_class(verbose=False).run_case(files, None, pm, cm, bench.dataset_json)
    img = sitk.ReadImage(str(raw / "labelsTr" / f"{case}{ending}"))
    return data, props, sitk.GetArrayFromImage(img).astype(np.int64), np.asarray(img.GetSpacing())[::-1], img


def prepare(args: argparse.Namespace) -> BenchSetup:
    """What bench_value, value_models and bench_own_path do first, from bench_value's flags: logging, nnU-Net's
    environment in ``--work``, torch threads, ``args.budget_tag``, the dataset planned and preprocessed, the
    benchmark plans and the held-out split (written once, atomically)."""
    from bench_value import write_splits
    C.setup_logging(args.verbose)
    C.setup_env(args.work, n_proc_da=args.n_proc_da)
    import torch
    torch.set_num_threads(args.threads)
    args.budget_tag = budget_tag(args)
    name = C.resolve_dataset_name(args.d)
    folder = C.ensure_planned(name, [args.configuration], preprocess=True)
    plans, dataset_json = load_bench_plans(name, args)
    test, splits = write_splits(folder, C.case_ids(name), args.n_test)
    return BenchSetup(name, folder, plans, dataset_json, test[: args.max_test_cases], splits)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from bench_value import build_parser
    parser = build_parser()
    parser.description = "train one bench_value model: METHOD SEED [--fold F] [bench_value flags]"
    parser.add_argument("method", choices=["nnunet", "ours"])
    parser.add_argument("seed", type=int)
    parser.add_argument("--fold", type=int, default=0)
    args = parser.parse_args(argv)
    bench = prepare(args)
    _, seconds = train_or_load(args.method, args.fold, args.seed, args, bench.plans, bench.dataset_json)
    print(f"{args.method} fold {args.fold} seed {args.seed} ({args.budget_tag}): {seconds:.0f} s of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
