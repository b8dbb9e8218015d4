"""``mfs_plan_and_preprocess``: verify, fingerprint, plan (MedFlowSegPlanner) and preprocess a raw dataset."""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from medflowseg_nn.errors import UserError
from medflowseg_nn.cli.common import cli_errors, dataset_name, require_env, setup_logging

logger = logging.getLogger(__name__)
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEFAULT_PLANNER = "MedFlowSegPlanner"


def plan_and_preprocess(dataset_ids: Sequence[str], configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                        num_processes: Optional[Sequence[int]] = None, gpu_memory_target: Optional[float] = None,
                        verify_dataset_integrity: bool = True, no_pp: bool = False, clean: bool = False,
                        overwrite_plans_name: Optional[str] = None,
                        overwrite_target_spacing: Optional[Sequence[float]] = None,
                        planner: str = DEFAULT_PLANNER) -> dict[str, dict]:
    """Run the whole preparation for each dataset; returns ``{dataset_name: plans}``.

    The raw dataset is checked before anything is written to ``nnUNet_preprocessed``.
    """
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset, preprocess_dataset)
    from medflowseg_nn.plugins import get_planner_class

    planner_class = get_planner_class(planner)
    raw = require_env("nnUNet_raw")
    require_env("nnUNet_preprocessed")
    names = [dataset_name(d) for d in dataset_ids]
    nproc = list(num_processes) if num_processes else [2] * len(configurations)
    results = {}
    for name in names:
        dataset_id = int(name[7:10])
        if verify_dataset_integrity:
            from medflowseg_nn.dataset_checks import verify_raw_dataset
            verify_raw_dataset(join(raw, name), num_processes=max(nproc))
            logger.info("%s: dataset integrity verified", name)
        extract_fingerprint_dataset(dataset_id, num_processes=max(nproc), check_dataset_integrity=False,
                                    clean=clean, verbose=False)
        plans, identifier = plan_experiment_dataset(dataset_id, planner_class, gpu_memory_target,
                                                    overwrite_target_spacing=overwrite_target_spacing,
                                                    overwrite_plans_name=overwrite_plans_name)
        for cfg, c in plans["configurations"].items():
            if "patch_size" in c:
                logger.info("%s %s: patch %s, batch %s", name, cfg, c["patch_size"], c["batch_size"])
        if not no_pp:
            todo = [c for c in configurations if c in plans["configurations"]]
            preprocess_dataset(dataset_id, identifier, todo, [nproc[configurations.index(c)] for c in todo])
        results[name] = plans
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_plan_and_preprocess", description=__doc__)
    p.add_argument("-d", nargs="+", required=True, help="dataset ids or names, e.g. -d 4")
    p.add_argument("-c", nargs="+", default=list(DEFAULT_CONFIGURATIONS), help="configurations to preprocess")
    p.add_argument("-np", nargs="+", type=int, default=None,
                   help="processes per configuration (one number, or one per -c entry); default 2")
    p.add_argument("-pl", default=DEFAULT_PLANNER,
                   help=f"experiment planner (default {DEFAULT_PLANNER}; nnU-Net's residual-encoder presets: "
                        "MedFlowSegPlannerResEncM, ...ResEncL, ...ResEncXL, plans MedFlowSegResEncUNet{M,L,XL}Plans)")
    p.add_argument("--gpu_memory_target", type=float, default=None, help="GPU memory in GB to plan for (8)")
    p.add_argument("-overwrite_plans_name", default=None, help="plans identifier (default: the planner's, MedFlowSegPlans)")
    p.add_argument("-overwrite_target_spacing", nargs="+", type=float, default=None)
    p.add_argument("--verify_dataset_integrity", action="store_true", default=True,
                   help="check the raw dataset first (default on)")
    p.add_argument("--no_verify", dest="verify_dataset_integrity", action="store_false",
                   help="skip the dataset checks")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if it exists")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.np and len(args.np) not in (1, len(args.c)):
        raise UserError(f"-np takes 1 number or one per configuration ({len(args.c)}), got {len(args.np)}")
    nproc = args.np * len(args.c) if args.np and len(args.np) == 1 else args.np
    plan_and_preprocess(dataset_ids=args.d, configurations=args.c, num_processes=nproc,
                        gpu_memory_target=args.gpu_memory_target,
                        verify_dataset_integrity=args.verify_dataset_integrity, no_pp=args.no_pp, clean=args.clean,
                        overwrite_plans_name=args.overwrite_plans_name,
                        overwrite_target_spacing=args.overwrite_target_spacing, planner=args.pl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
