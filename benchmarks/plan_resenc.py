"""Planned patch and batch size of the residual-encoder presets: MedFlowSegPlannerResEncM vs nnU-Net's
nnUNetPlannerResEncM (and any other ResEnc size), planning only.

Per dataset: nnU-Net's fingerprint, then each planner's plans (no preprocessing), in a temporary
``nnUNet_preprocessed`` (``--work``, default a fresh temporary folder; the raw data are symlinks into the shared
data). Both planners size patch and batch against the same ResEnc reference values; ours counts the feature
maps of ``ResidualEncoderVectorFieldUNet`` (time modulation, conditioning encoder, DBSA / FAA buffers) plus the
image ⊕ x_t input, nnU-Net's those of ``ResidualEncoderUNet``.

    python benchmarks/plan_resenc.py -d 4 140 [--sizes M L XL]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.plan_resenc")
COLUMNS = ("dataset", "configuration", "planner", "patch", "batch", "stages", "blocks per stage",
           "median shape", "plan s")


def planner_classes(size: str) -> dict[str, type]:
    """``{label: planner class}`` of one ResEnc size, ours first."""
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as R

    from medflowseg_nn.plugins import get_planner_class
    return {f"MedFlowSegPlannerResEnc{size}": get_planner_class(f"MedFlowSegPlannerResEnc{size}"),
            f"nnUNetPlannerResEnc{size}": getattr(R, f"nnUNetPlannerResEnc{size}")}


def plan_dataset(name: str, sizes: Sequence[str], configurations: Sequence[str]) -> list[dict]:
    """Fingerprint ``name`` once, plan it with every planner; one row per (configuration, planner)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset)
    C.link_dataset(name, Path(os.environ["nnUNet_raw"]))
    dataset_id = int(name[7:10])
    start = time.perf_counter()
    extract_fingerprint_dataset(dataset_id, num_processes=int(os.environ["nnUNet_def_n_proc"]),
                                check_dataset_integrity=False, clean=False, verbose=False)
    logger.info("%s: fingerprint in %.0f s", name, time.perf_counter() - start)
    rows = []
    for size in sizes:
        for label, cls in planner_classes(size).items():
            start = time.perf_counter()
            plans, _ = plan_experiment_dataset(dataset_id, cls)
            seconds = time.perf_counter() - start
            for cfg in configurations:
                c = plans["configurations"].get(cfg)
                if c is None:
                    rows.append({"dataset": name, "configuration": cfg, "planner": label, "patch": "not planned"})
                    continue
                arch = c["architecture"]["arch_kwargs"]
                rows.append({"dataset": name, "configuration": cfg, "planner": label,
                             "patch": "x".join(map(str, c["patch_size"])), "batch": c["batch_size"],
                             "stages": arch["n_stages"],
                             "blocks per stage": ",".join(map(str, arch["n_blocks_per_stage"])),
                             "median shape": "x".join(map(str, c["median_image_size_in_voxels"])),
                             "network": c["architecture"]["network_class_name"], "plan s": round(seconds, 1),
                             "plans_name": plans["plans_name"]})
            logger.info("%s %s: planned in %.0f s", name, label, seconds)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--datasets", nargs="+", default=["4", "140"], help="dataset ids or names")
    p.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres", "2d", "3d_lowres"])
    p.add_argument("--sizes", nargs="+", default=["M"], choices=("M", "L", "XL"))
    p.add_argument("--work", type=Path, default=None, help="nnU-Net folders (default: a new temporary folder)")
    p.add_argument("--out", type=Path, default=C.REPO_ROOT / "benchmarks" / "out" / "plan_resenc.json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    C.setup_logging(args.verbose)
    work = args.work or Path(tempfile.mkdtemp(prefix="mfs_plan_resenc_"))
    C.setup_env(work)
    import medflowseg_nn.planners.mfs_resenc_planners  # noqa: F401 - the code measured, for machine_info's git state
    info = C.machine_info()
    rows = []
    for d in args.datasets:
        rows += plan_dataset(C.resolve_dataset_name(d), args.sizes, args.configurations)
    print(C.markdown_table(rows, COLUMNS))
    C.write_json(args.out, {"benchmark": "plan_resenc", "machine": info, "args": vars(args) |
                            {"work": str(work), "out": str(args.out)}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
