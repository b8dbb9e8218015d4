"""Kill mfs_train (SIGTERM, then SIGKILL) mid-training; --c resumes and loses at most the current epoch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from medflowseg_nn.cli import plan_and_preprocess, train
from medflowseg_nn.synthetic import make_synthetic_dataset

TRAIN = [sys.executable, "-m", "medflowseg_nn.cli.train", "990", "3d_fullres", "0", "-tr",
         "MedFlowSegTrainer_smoke", "-device", "cpu"]


def newest_log_mentions(fold: Path, text: str, logs_before: int) -> bool:
    logs = sorted(fold.glob("training_log_*.txt"))
    return len(logs) > logs_before and text in logs[-1].read_text()


def start_and_kill(fold: Path, sig: int, args: list[str], ready) -> None:
    """Start training, wait until ``ready()`` is true, then send ``sig``."""
    proc = subprocess.Popen(TRAIN + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.time() + 240
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be interrupted"
    assert ready(), "training never reached the point to interrupt"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0


def test_kill_and_resume(nnunet_env):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, num_train=5, shape=(16, 20, 16))
    assert plan_and_preprocess.main(["-d", "990", "-c", "3d_fullres", "-np", "1"]) == 0
    fold = nnunet_env["nnUNet_results"] / "Dataset990_Synthetic" / "MedFlowSegTrainer_smoke__MedFlowSegPlans__3d_fullres" / "fold_0"

    # SIGTERM once epoch 0 is checkpointed (during epoch 1)
    start_and_kill(fold, signal.SIGTERM, [], lambda: (fold / "checkpoint_latest.pth").is_file())
    assert not (fold / "checkpoint_final.pth").exists()
    ckpt = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1  # epoch 0 is done and safe

    # SIGKILL a resumed run while it trains epoch 1 again: the checkpoint on disk stays loadable
    logs = len(list(fold.glob("training_log_*.txt")))
    time.sleep(1.1)  # training logs are named by the second
    start_and_kill(fold, signal.SIGKILL, ["--c"], lambda: newest_log_mentions(fold, "Epoch 1", logs))
    ckpt = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] >= 1

    time.sleep(1.1)
    trainer = train.run_training("990", "3d_fullres", 0, "MedFlowSegTrainer_smoke", continue_training=True,
                                 device=torch.device("cpu"))
    assert trainer.current_epoch == 2
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    # the resumed run started from epoch 1: epoch 0 was not trained again
    last_log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert "Epoch 1" in last_log and "Epoch 0\n" not in last_log
