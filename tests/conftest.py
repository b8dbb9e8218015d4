"""Shared fixtures: isolated nnU-Net folders, synthetic datasets and the real data path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: real datasets in nnU-Net raw format; override with MFS_SHARED_DATA
SHARED_DATA = Path(os.environ.get("MFS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def set_nnunet_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Create nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``root``, point the env vars at them, and use
    2 export workers and single-threaded data augmentation."""
    paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in paths.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
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
