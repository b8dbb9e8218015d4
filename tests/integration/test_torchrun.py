"""``torchrun --nproc_per_node 2 mfs_train ... -device cpu``: one gloo job (not two independent trainings)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medflowseg_nn.cli import plan_and_preprocess
from medflowseg_nn.synthetic import make_synthetic_dataset

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
MFS_TRAIN = shutil.which("mfs_train") or str(Path(sys.executable).parent / "mfs_train")


def two_ranks(log_dir: Path, program: str, *args: str) -> list[str]:
    """torchrun with two ranks on this machine running ``program args``; each rank's output kept in ``log_dir``."""
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--log-dir", str(log_dir), "--tee", "3", program, *args]


def rank_env(**extra: str) -> dict[str, str]:
    """The environment of the ranks: no data-augmentation workers, one nnU-Net process, plus ``extra``."""
    return dict(os.environ, nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", **extra)


def failure_report(run: subprocess.CompletedProcess, log_dir: Path) -> str:
    """The combined log's tail, then each rank's own output (``torchrun --tee 3`` keeps one file per rank and
    stream): the rank that failed first is often cut from the combined tail by the other rank's traceback."""
    ranks = sorted(log_dir.rglob("std*.log"))
    return "\n".join([(run.stdout + run.stderr)[-3000:],
                      *(f"--- {f.relative_to(log_dir)} ---\n{f.read_text(errors='replace')[-4000:]}" for f in ranks)])


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_torchrun_two_cpu_ranks_train_one_model_and_resume(nnunet_env, tmp_path):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 993, num_train=6, shape=(20, 24, 20))
    assert plan_and_preprocess.main(["-d", "993", "-c", "3d_fullres", "-np", "1"]) == 0
    env = rank_env(MFS_DDP_TIMEOUT="300")
    cmd = two_ranks(tmp_path / "ranks", MFS_TRAIN, "993", "3d_fullres", "0", "-tr", "MedFlowSegTrainer_smoke",
                    "-device", "cpu")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = first.stdout + first.stderr
    assert first.returncode == 0, failure_report(first, tmp_path / "ranks")
    assert len(list((tmp_path / "ranks").rglob("stderr.log"))) == 2  # what a failure would show: both ranks
    assert "rank 0 of 2" in log and "rank 1 of 2" in log and "The world size is 2" in log
    model = "MedFlowSegTrainer_smoke__MedFlowSegPlans__3d_fullres"
    fold = nnunet_env["nnUNet_results"] / "Dataset993_Synthetic" / model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and not list(fold.glob("*.tmp"))
    debug = json.loads((fold / "debug.json").read_text())
    assert str(debug["batch_size"]) == "1"  # the plans' batch of 2, split over 2 ranks
    assert len(list(fold.glob("training_log_*.txt"))) == 1  # rank 0 logs, not both
    assert sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))  # validation shared by the ranks

    resumed = subprocess.run(cmd + ["--c"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, failure_report(resumed, tmp_path / "ranks")


DYING_RANK = """
import os, sys, threading
from medflowseg_nn.cli.train import main
if __name__ == "__main__":  # a spawned worker imports this file again: only the rank itself trains
    if os.environ["RANK"] == "1":  # this rank dies mid-training, as a node that loses power would
        threading.Timer(float(os.environ["DIE_AFTER_S"]), lambda: os._exit(17)).start()
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_a_dying_rank_ends_the_job_with_an_error_instead_of_a_hang(nnunet_env, tmp_path):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 994, num_train=6, shape=(20, 24, 20))
    assert plan_and_preprocess.main(["-d", "994", "-c", "3d_fullres", "-np", "1"]) == 0
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    env = rank_env(MFS_DDP_TIMEOUT="60", DIE_AFTER_S="25")
    cmd = two_ranks(tmp_path / "ranks", str(script), "994", "3d_fullres", "0", "-tr", "MedFlowSegTrainer_demo",
                    "-device", "cpu", "--quiet")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode != 0, failure_report(run, tmp_path / "ranks")
    # once (2026-12-06, suite beside a benchmark): rank 0 saw "Connection closed by peer" at nnU-Net's
    # on_train_start barrier before rank 1's timer fired, and rank 1 was SIGTERMed — each rank's own log says why
    assert "exitcode  : 17" in log or "exitcode: 17" in log or "exit code 17" in log.lower(), \
        failure_report(run, tmp_path / "ranks")


EMA_RANKS = """
import hashlib, os, sys
import torch
import medflowseg_nn.trainers.weight_average as wa
from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_smoke


class MedFlowSegTrainer_emaSmokeDDP(wa.MedFlowSegTrainer_ema):
    trainer_overrides = MedFlowSegTrainer_smoke.trainer_overrides
    val_multistep_batches = 1
    ema_window_fraction = 0.5

    def on_train_end(self):
        super().on_train_end()  # the network now holds the EMA: each rank writes a digest of the weights it holds
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in unwrap(self.network).state_dict().values())
        with open(os.path.join(self.output_folder, f"weights_rank{self.local_rank}.sha"), "w") as f:
            f.write(hashlib.sha256(weights).hexdigest())


wa.MedFlowSegTrainer_emaSmokeDDP = MedFlowSegTrainer_emaSmokeDDP  # a registered module: found by name
if __name__ == "__main__":  # the validation's spawned workers import this file again: they must not train
    from medflowseg_nn.cli.train import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_torchrun_ema_ranks_end_with_the_same_averaged_weights_and_resume(nnunet_env, tmp_path):
    """``MedFlowSegTrainer_ema`` under two gloo ranks: every rank keeps its own EMA of the (all-reduced, hence
    equal) weights, so both validate with the same averaged network; rank 0 alone writes the companion files."""
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 995, num_train=6, shape=(20, 24, 20))
    assert plan_and_preprocess.main(["-d", "995", "-c", "3d_fullres", "-np", "1"]) == 0
    script = tmp_path / "ema_ranks.py"
    script.write_text(EMA_RANKS)
    env = rank_env(MFS_DDP_TIMEOUT="300")
    cmd = two_ranks(tmp_path / "ranks", str(script), "995", "3d_fullres", "0", "-tr", "MedFlowSegTrainer_emaSmokeDDP",
                    "-device", "cpu")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, failure_report(first, tmp_path / "ranks")
    fold = nnunet_env["nnUNet_results"] / "Dataset995_Synthetic" / \
        "MedFlowSegTrainer_emaSmokeDDP__MedFlowSegPlans__3d_fullres" / "fold_0"
    digests = [(fold / f"weights_rank{r}.sha").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "EMA of the weights: window 2 iterations" in log and "now holds the EMA of its weights (4 updates)" in log
    assert (fold / "checkpoint_final.pth").is_file()
    assert not (fold / "checkpoint_latest_weight_average.pth").exists()  # removed at the end, by rank 0
    resumed = subprocess.run(cmd + ["--c"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, failure_report(resumed, tmp_path / "ranks")
