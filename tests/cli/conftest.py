"""Shared by the after-training workflow tests (ensemble / postprocessing, find-best, model zips): one synthetic
dataset planned and preprocessed once per session (2d and 3d_fullres, shrunk networks) that each module copies
into its own nnU-Net folders and trains there. Planning costs ~20 s on 2 cores (nnU-Net's fingerprint draws
10^7 foreground samples and every step spawns a worker pool), so it is paid once, not once per module."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.synthetic import make_synthetic_dataset
from tests.conftest import set_nnunet_env, shrink_network

TRAINER = "MedFlowSegTrainer_smokeOneEpoch"
WORKFLOW_DATASET = 984
WORKFLOW_CONFIGURATIONS = ("2d", "3d_fullres")


@pytest.fixture(scope="session")
def planned_workflow_dataset(tmp_path_factory) -> Path:
    """A root whose ``nnUNet_raw`` / ``nnUNet_preprocessed`` hold dataset 984 (5 training, 2 test cases of
    16 x 20 x 16) planned for 2d and 3d_fullres with networks of 4-16 features and one conv per stage."""
    root = tmp_path_factory.mktemp("planned_workflow")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", WORKFLOW_DATASET, num_train=5, num_test=2,
                                     shape=(16, 20, 16))
        assert plan_and_preprocess.main(["-d", str(WORKFLOW_DATASET), "-c", *WORKFLOW_CONFIGURATIONS, "-np", "1",
                                         "--no_verify"]) == 0
    shrink_network(root / "nnUNet_preprocessed" / raw.name / "MedFlowSegPlans.json", WORKFLOW_CONFIGURATIONS,
                   first=4, cap=16)
    return root


def train_smoke_folds(planned: Path, root: Path, folds: tuple[int, ...],
                      configurations: tuple[str, ...] = ("3d_fullres",), extra: tuple[str, ...] = ()):
    """Copy the planned dataset into ``root`` (whose nnU-Net env vars are set) and train ``TRAINER`` folds of each
    configuration (``extra``: more ``mfs_train`` flags, e.g. ``--npz``) → (raw folder, model folder of the first
    configuration)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(planned / name, root / name, dirs_exist_ok=True)
    raw = next((root / "nnUNet_raw").iterdir())
    for configuration in configurations:
        for fold in folds:
            assert train.main([str(WORKFLOW_DATASET), configuration, str(fold), "-tr", TRAINER, "-device", "cpu",
                               *extra]) == 0
    return raw, root / "nnUNet_results" / raw.name / f"{TRAINER}__MedFlowSegPlans__{configurations[0]}"


def predict_into(model, inputs, out, fold: str, *extra: str) -> int:
    return predict.main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", fold, "-device", "cpu",
                         "--disable_tta", "-npp", "0", "-nps", "0", "--save_probabilities", *extra])
