"""Shared plumbing of the benchmark scripts: data location, nnU-Net folders, plans, machine info, tables.

The real data stays where it is (``../shared/data`` relative to the repo root, or ``$MFS_SHARED_DATA``); a
working folder (default ``benchmarks/out/work``, git-ignored) gets ``nnUNet_raw`` (symlinks only),
``nnUNet_preprocessed`` and ``nnUNet_results``. Call :func:`setup_env` before anything imports ``nnunetv2``
(it reads its paths at import).
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

logger = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO_ROOT / "benchmarks" / "out" / "work"  # git-ignored; override with --work
OUR_PLANS = "MedFlowSegPlans"
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"

if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, str(REPO_ROOT))


def shared_data_dir() -> Path:
    return Path(os.environ.get("MFS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def setup_env(work: Path, n_proc_da: Optional[str] = None) -> dict[str, Path]:
    """nnU-Net folders under ``work`` and 2 worker processes (unless already set)."""
    paths = {n: work / n for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in paths.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    if n_proc_da is not None:
        os.environ["nnUNet_n_proc_DA"] = n_proc_da
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    return paths


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("benchmarks", "medflowseg_nn", "planners", "trainers"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def resolve_dataset_name(name_or_id: str) -> str:
    """``4`` / ``Dataset004_Hippocampus`` → the folder name in the shared data."""
    root = shared_data_dir()
    if not str(name_or_id).isdigit():
        return str(name_or_id)
    prefix = f"Dataset{int(name_or_id):03d}_"
    found = sorted(p.name for p in root.glob(prefix + "*") if (p / "dataset.json").is_file())
    if not found:
        raise FileNotFoundError(f"no {prefix}* dataset in {root} (set MFS_SHARED_DATA)")
    return found[0]


def link_dataset(name: str, raw_root: Path) -> Path:
    """``raw_root/name`` as symlinks into the shared data (nothing is copied); idempotent."""
    source = shared_data_dir() / name
    if not (source / "dataset.json").is_file():
        raise FileNotFoundError(f"{source}/dataset.json not found (set MFS_SHARED_DATA)")
    target = raw_root / name
    if (target / "dataset.json").is_file():
        return target
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / sub).iterdir()):
            link = target / sub / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    (target / "dataset.json").symlink_to((source / "dataset.json").resolve())
    return target


def ensure_planned(name: str, configurations: Sequence[str], preprocess: bool = True) -> Path:
    """MedFlowSegPlans for ``name`` (planned once with our planner); preprocess ``configurations`` if asked.

    Returns the dataset's folder in ``nnUNet_preprocessed``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    link_dataset(name, Path(os.environ["nnUNet_raw"]))
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    dataset_id = int(name[7:10])
    if not (folder / f"{OUR_PLANS}.json").is_file():
        from medflowseg_nn.cli.plan_and_preprocess import plan_and_preprocess
        logger.info("%s: fingerprint + MedFlowSegPlanner (first run only)", name)
        plan_and_preprocess([name], configurations, verify_dataset_integrity=False, no_pp=True)
    if preprocess:
        plans = load_json(str(folder / f"{OUR_PLANS}.json"))
        todo = []
        for cfg in configurations:
            data_id = plans["configurations"][cfg].get("data_identifier", f"{OUR_PLANS}_{cfg}")
            if not (folder / data_id).is_dir() or not any((folder / data_id).iterdir()):
                todo.append(cfg)
        if todo:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
            logger.info("%s: preprocessing %s (first run only)", name, todo)
            preprocess_dataset(dataset_id, OUR_PLANS, todo, [int(os.environ["nnUNet_def_n_proc"])] * len(todo))
    return folder


def add_output_args(parser: Any, out_name: str, work: bool = True, verbose: bool = True) -> None:
    """The options the benchmark scripts share: ``--work`` (the nnU-Net folders), ``--out`` (the JSON, default
    ``benchmarks/out/<out_name>``) and ``--verbose`` (DEBUG logging); ``parser`` an ``argparse.ArgumentParser``."""
    if work:
        parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                            help="nnU-Net folders (default benchmarks/out/work)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out" / out_name,
                        help=f"result JSON (default benchmarks/out/{out_name})")
    if verbose:
        parser.add_argument("--verbose", action="store_true")


def load_plans(name: str) -> tuple[dict, dict]:
    """(MedFlowSegPlans dict, dataset.json dict) from ``nnUNet_preprocessed``."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    return (json.loads((folder / f"{OUR_PLANS}.json").read_text()),
            json.loads((folder / "dataset.json").read_text()))


def plain_unet_plans(plans: dict) -> dict:
    """A copy of our plans whose architecture is nnU-Net's ``PlainConvUNet`` (same stages, features, kernels,
    strides, patch and batch size): what ``nnUNetTrainer`` trains on for a same-plans comparison. The VRAM
    estimate that fixed patch/batch size was made for our network; nothing else differs."""
    plain = copy.deepcopy(plans)
    for cfg in plain["configurations"].values():
        if "architecture" in cfg:
            cfg["architecture"]["network_class_name"] = PLAIN_UNET
    return plain


def trainer_for(method: str, plans: dict, dataset_json: dict, configuration: str, fold: int, device: Any,
                ours_trainer: str = "MedFlowSegTrainer"):
    """``ours`` → ``ours_trainer`` (MedFlowSegTrainer or a variant) on our plans; ``nnunet`` → nnUNetTrainer on the
    PlainConvUNet copy."""
    from medflowseg_nn.plugins import get_trainer_class
    if method not in ("ours", "nnunet"):
        raise ValueError(f"unknown method {method!r}")
    plans = copy.deepcopy(plans) if method == "ours" else plain_unet_plans(plans)
    plans["continue_training"] = False  # nnU-Net 2.8's trainer reads this key (mfs_train's build_trainer sets it)
    name = ours_trainer if method == "ours" else "nnUNetTrainer"
    return get_trainer_class(name)(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                   device=device)


def case_ids(name: str) -> list[str]:
    source = shared_data_dir() / name
    ending = json.loads((source / "dataset.json").read_text())["file_ending"]
    return sorted(p.name[: -len(ending)] for p in (source / "labelsTr").iterdir() if p.name.endswith(ending))


def machine_info() -> dict[str, Any]:
    import torch
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
        # tracked files with uncommitted changes: what was measured is the working tree, not just the commit
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=False).stdout.split()
    except OSError:
        commit, dirty = "", []
    try:
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
    except Exception:  # noqa: BLE001 - informational only
        nnunet_version = "unknown"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_at_start":
            os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "nnunetv2": nnunet_version, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_commit": commit, "git_modified_files": dirty, "argv": sys.argv}


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))
    logger.info("wrote %s", path)


def markdown_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:  # undefined (e.g. a rank correlation over fewer than 3 cases)
            return "—"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
