"""Shared fixtures: isolated nnU-Net folders, synthetic datasets and the real data path."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: real datasets in nnU-Net raw format; override with MFS_SHARED_DATA
SHARED_DATA = Path(os.environ.get("MFS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def set_nnunet_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Create nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``root``, point the env vars at them, and use
    2 export workers and single-threaded data augmentation. ``MFS_TUNE_MALLOC=0``: the ``mfs_*`` mains that tests
    call in this process would otherwise raise its malloc thresholds and write glibc's variables into its
    environment for every later test (``medflowseg_nn.cpu_allocator``, tested on its own)."""
    paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in paths.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("MFS_TUNE_MALLOC", "0")
    return paths


@pytest.fixture
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh nnU-Net folders under tmp_path (see :func:`set_nnunet_env`)."""
    return set_nnunet_env(tmp_path, monkeypatch)


def shared_dataset(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "dataset.json").is_file():
        pytest.skip(f"real dataset {folder} not available (set MFS_SHARED_DATA)")
    return folder


def plan_synthetic_dataset(root: Path, monkeypatch: pytest.MonkeyPatch, dataset_id: int, *, num_train: int = 5,
                           shape: tuple[int, ...] = (16, 20, 16), configuration: str = "3d_fullres",
                           preprocess: bool = True, **synthetic: object) -> SimpleNamespace:
    """nnU-Net folders under ``root`` (:func:`set_nnunet_env`), a synthetic dataset (``make_synthetic_dataset``
    with ``synthetic`` options) planned — and preprocessed unless ``preprocess=False`` — by mfs_plan_and_preprocess.
    Returns ``SimpleNamespace(raw, preprocessed, plans_file, plans, dataset_json)``."""
    from medflowseg_nn.cli import plan_and_preprocess
    from medflowseg_nn.synthetic import make_synthetic_dataset

    set_nnunet_env(root, monkeypatch)
    raw = make_synthetic_dataset(root / "nnUNet_raw", dataset_id, num_train=num_train, shape=shape, **synthetic)
    flags = ["-d", str(dataset_id), "-c", configuration, "-np", "1", "--no_verify"]
    assert plan_and_preprocess.main(flags if preprocess else [*flags, "--no_pp"]) == 0
    pre = root / "nnUNet_preprocessed" / raw.name
    return SimpleNamespace(raw=raw, preprocessed=pre, plans_file=pre / "MedFlowSegPlans.json",
                           plans=json.loads((pre / "MedFlowSegPlans.json").read_text()),
                           dataset_json=json.loads((pre / "dataset.json").read_text()))


def tiny_network_plans(plans: dict, configuration: str = "3d_fullres") -> dict:
    """A copy of ``plans`` whose network is 3 stages of 4 / 8 / 16 features with one conv each (fast trainer tests),
    not continuing a training."""
    plans = copy.deepcopy(plans)
    plans["configurations"][configuration]["architecture"]["arch_kwargs"].update(
        features_per_stage=[4, 8, 16], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    plans["continue_training"] = False
    return plans


def shrink_network(plans_path: Path, configurations: tuple[str, ...] = ("3d_fullres",), first: int = 8,
                   cap: int = 64) -> None:
    """Few features (``first`` doubling up to ``cap``) and one conv per stage for each configuration's planned
    network, in place (the stage count and patch size stay the planner's): a smoke run, not a model."""
    plans = json.loads(plans_path.read_text())
    for configuration in configurations:
        arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
        n = arch["n_stages"]
        arch.update(features_per_stage=[min(first * 2 ** i, cap) for i in range(n)], n_conv_per_stage=[1] * n,
                    n_conv_per_stage_decoder=[1] * (n - 1))
    plans_path.write_text(json.dumps(plans, indent=2))

