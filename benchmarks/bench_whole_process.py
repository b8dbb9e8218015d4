"""Whole-process prediction: ``mfs_predict`` vs nnU-Net's own ``nnUNetv2_predict_from_modelfolder``, what a user
waits for (interpreter start-up, imports, model loading, preprocessing workers, sliding window, export).

Both commands run as subprocesses under ``/usr/bin/time`` (wall seconds, peak RSS of the main process) on the
same input folder, each with its own defaults (``-npp``/``-nps``: ours 2/2, nnU-Net's 3/3; torch threads: all
cores for both, as both entry points set), TTA on and off. The two models share the MedFlowSegPlans of the
dataset: ours is ``MedFlowSegTrainer``'s vector field, nnU-Net's the ``PlainConvUNet`` of the same stages,
features, patch (``common.plain_unet_plans``); both freshly initialised (seed 0) and saved as fold 0 of a model
folder — wall time does not depend on weight values. Runs alternate order per repeat, so slow drift of the
machine's load hits both alike; reported: median wall and median peak RSS per (dataset, TTA, tool) and their
ratios ours / nnU-Net.

    python benchmarks/bench_whole_process.py --datasets 4 --num_cases 10 --repeats 5
    python benchmarks/bench_whole_process.py --datasets 140 --num_cases 2 --repeats 3 --tta off
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.whole_process")
TOOLS = ("nnunet", "ours")
#: ``--allocator_rows``: each command with the other's glibc malloc setting (``medflowseg_nn.cpu_allocator``:
#: mfs_predict raises the thresholds itself), so that the allocator's share of a ratio is seen apart
ALLOCATOR_TOOLS = ("nnunet_tuned_malloc", "ours_untuned_malloc")
BIN = Path(sys.executable).parent


def method_of(tool: str) -> str:
    """The model and command a row runs: ``nnunet`` or ``ours`` (an allocator row's name starts with it)."""
    return tool.split("_")[0]


def tool_env(tool: str) -> dict:
    """The environment a tool's command runs with: this process's, plus the allocator setting of its row."""
    from medflowseg_nn.cpu_allocator import ENV_SWITCH, GLIBC_ENV
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_ENV}
    if tool == "nnunet_tuned_malloc":
        env.update({k: str(v) for k, v in GLIBC_ENV.items()})
    elif tool == "ours_untuned_malloc":
        env[ENV_SWITCH] = "0"
    return env


def make_model_folder(method: str, name: str, folder: Path) -> Path:
    """A model folder (plans.json, dataset.json, dataset_fingerprint.json, fold_0/checkpoint_final.pth) holding a
    freshly initialised network of ``method`` on the dataset's plans; reused when it exists.

    The dataset need not be preprocessed: ``trainer.initialize()`` only looks into the preprocessed folder to pick
    nnU-Net's dataset class (for training, which never happens here), so that lookup is stubbed."""
    from unittest import mock

    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if checkpoint.is_file():
        return folder
    torch.manual_seed(0)
    plans, dataset_json = C.load_plans(name)
    trainer = C.trainer_for(method, plans, dataset_json, "3d_fullres", 0, torch.device("cpu"))
    with mock.patch("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class",
                    return_value=nnUNetDatasetBlosc2):
        trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the TTA mirror axes it saves
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(checkpoint))
    (folder / "plans.json").write_text(json.dumps(trainer.plans_manager.plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    shutil.copy(Path(os.environ["nnUNet_preprocessed"]) / name / "dataset_fingerprint.json", folder)
    return folder


def link_inputs(name: str, num_cases: int, folder: Path) -> Path:
    """The first ``num_cases`` training images of the shared dataset, linked as an input folder."""
    folder.mkdir(parents=True, exist_ok=True)
    source = C.shared_data_dir() / name / "imagesTr"
    cases = sorted({p.name[: -len("_0000.nii.gz")] for p in source.iterdir() if p.name.endswith(".nii.gz")})
    for case in cases[:num_cases]:
        for image in sorted(source.glob(f"{case}_*.nii.gz")):
            link = folder / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return folder


def command(tool: str, inputs: Path, out: Path, model: Path, tta: bool, nnunet_workers: Optional[int] = None
            ) -> list[str]:
    if method_of(tool) == "ours":
        cmd = [str(BIN / "mfs_predict"), "-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0",
               "-device", "cpu"]
    else:
        cmd = [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(out), "-m", str(model),
               "-f", "0", "-device", "cpu"]
        if nnunet_workers is not None:
            cmd += ["-npp", str(nnunet_workers), "-nps", str(nnunet_workers)]
    return cmd + ([] if tta else ["--disable_tta"])


def timed_run(cmd: list[str], env: Optional[dict] = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the main process) of ``cmd`` under GNU time; raises when it fails."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-o", f.name, "-f", "%e %M", *cmd], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        wall, rss_kib = f.read().split()[-2:]
    return float(wall), float(rss_kib) / 1024.0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (dataset, TTA): median wall / RSS per tool; ``wall_ratio`` etc. = ours / nnU-Net, and with the
    allocator rows ``{tool}_vs_nnunet`` for each of them."""
    rows = []
    for key in sorted({(r["dataset"], r["tta"]) for r in runs}):
        tools = [t for t in TOOLS + ALLOCATOR_TOOLS if any(r["tool"] == t for r in runs)]
        by_tool = {tool: [r for r in runs if (r["dataset"], r["tta"], r["tool"]) == (*key, tool)] for tool in tools}
        row: dict = {"dataset": key[0], "tta": key[1], "repeats": len(by_tool["ours"])}
        for tool, mine in by_tool.items():
            row[f"{tool}_wall_s"] = statistics.median(r["wall_s"] for r in mine)
            row[f"{tool}_rss_mb"] = statistics.median(r["rss_mb"] for r in mine)
        row["wall_ratio"] = row["ours_wall_s"] / row["nnunet_wall_s"]
        row["rss_ratio"] = row["ours_rss_mb"] / row["nnunet_rss_mb"]
        row["pair_ratios"] = " ".join(f"{o['wall_s'] / n['wall_s']:.2f}"
                                      for o, n in zip(by_tool["ours"], by_tool["nnunet"]))
        for tool in tools[2:]:
            row[f"{tool}_vs_nnunet"] = row[f"{tool}_wall_s"] / row["nnunet_wall_s"]
        rows.append(row)
    return rows


def bench_whole_process(datasets: Sequence[str], num_cases: int, repeats: int, tta: Sequence[str], work: Path,
                        out: Path, nnunet_workers: Optional[int] = None, allocator_rows: bool = False,
                        warmup: int = 1) -> list[dict]:
    C.setup_env(work)
    tools = TOOLS + (ALLOCATOR_TOOLS if allocator_rows else ())
    runs: list[dict] = []
    for dataset in datasets:
        name = C.resolve_dataset_name(dataset)
        C.ensure_planned(name, ["3d_fullres"], preprocess=False)
        models = {tool: make_model_folder(tool, name, work / "whole_process_models" / name / tool)
                  for tool in TOOLS}
        inputs = link_inputs(name, num_cases, work / "whole_process_inputs" / name)
        for setting in tta:
            def run(tool: str) -> tuple[float, float]:
                target = work / "whole_process_out" / tool
                shutil.rmtree(target, ignore_errors=True)
                return timed_run(command(tool, inputs, target, models[method_of(tool)], setting == "on",
                                         nnunet_workers), tool_env(tool))

            for _ in range(warmup):  # warm-up runs (page cache, compiled kernels on disk), not counted
                for tool in tools:
                    run(tool)
            for r in range(repeats):
                for tool in (tools if r % 2 == 0 else tools[::-1]):
                    wall, rss = run(tool)
                    runs.append({"dataset": name, "tta": setting, "tool": tool, "repeat": r, "wall_s": wall,
                                 "rss_mb": rss, "cases": num_cases})
                    logger.info("%s tta %s %s repeat %d: %.1f s, %.0f MiB", name, setting, tool, r, wall, rss)
    rows = summarise(runs)
    C.write_json(out, {"machine": C.machine_info(), "runs": runs, "summary": rows})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["4"], help="dataset ids or names in the shared data")
    p.add_argument("--num_cases", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tta", nargs="+", choices=("on", "off"), default=["off", "on"])
    p.add_argument("--nnunet_workers", type=int, default=None,
                   help="-npp / -nps for nnU-Net's command (default: its own defaults, 3 / 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="uncounted runs of each command first (0: where the page cache is known to be warm)")
    p.add_argument("--allocator_rows", action="store_true",
                   help="also nnU-Net with mfs_predict's glibc malloc thresholds and ours without them")
    C.add_output_args(p, "bench_whole_process.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging(args.verbose)
    rows = bench_whole_process(datasets=args.datasets, num_cases=args.num_cases, repeats=args.repeats,
                               tta=args.tta, work=args.work, out=args.out,
                               nnunet_workers=args.nnunet_workers, allocator_rows=args.allocator_rows,
                               warmup=args.warmup)
    extra = [f"{t}_{c}" for t in ALLOCATOR_TOOLS for c in ("wall_s", "vs_nnunet")] if args.allocator_rows else []
    print(C.markdown_table(rows, ["dataset", "tta", "repeats", "nnunet_wall_s", "ours_wall_s", "wall_ratio",
                                  "pair_ratios", "nnunet_rss_mb", "ours_rss_mb", "rss_ratio", *extra]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
