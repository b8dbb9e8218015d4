"""Output parameterisation × time sampler on the same budget, against plain nnU-Net on the same plans.

Trains each variant for ``--iterations`` iterations (one epoch) on fold 0 and reports the validation pseudo Dice
of one-step inference (x0 from the seeded prior, t = 0) over ``--val_iterations`` batches, as nnU-Net's trainer
logs it. nnU-Net's ``nnUNetTrainer`` is trained on the same plans with the architecture switched back to
``PlainConvUNet`` (in memory). Prints a table and writes JSON.

    python benchmarks/calibrate_flow.py -d 4 -c 3d_fullres --iterations 60 --val_iterations 20
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger("calibrate_flow")
VARIANTS = ("nnUNetTrainer", "MedFlowSegTrainer", "MedFlowSegTrainer_uniformTime", "MedFlowSegTrainer_velocity",
            "MedFlowSegTrainer_velocityUniformTime")


def run_variant(name: str, dataset: str, configuration: str, iterations: int, val_iterations: int,
                device: torch.device, batch_size: Optional[int] = None) -> dict:
    from medflowseg_nn.cli.train import build_trainer
    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer

    trainer = build_trainer(dataset, configuration, 0, name, device=device)
    if not isinstance(trainer, MedFlowSegTrainer):  # plain nnU-Net: its own network on the same plans
        arch = trainer.configuration_manager.configuration["architecture"]
        arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    if batch_size:  # e.g. Hippocampus 2d plans ask for batch 277; a smaller batch keeps CPU runs short
        trainer.configuration_manager.configuration["batch_size"] = batch_size
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.disable_checkpointing = True
    torch.manual_seed(0)
    start = time.time()
    trainer.run_training()
    seconds = time.time() - start
    dice = [float(d) for d in trainer.logger.get_value("dice_per_class_or_region", step=-1)]
    return {"trainer": name, "dice_per_class": dice, "mean_dice": sum(dice) / len(dice),
            "train_loss": float(trainer.logger.get_value("train_losses", step=-1)), "seconds": seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4")
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--val_iterations", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("-device", default="cpu")
    p.add_argument("--out", default="benchmarks/out/calibrate_flow.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from medflowseg_nn.cli.common import pick_device
    device = pick_device(args.device)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, args.d, args.c, args.iterations, args.val_iterations, device,
                                args.batch_size))
        logger.info("%s", rows[-1])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\n{args.iterations} training iterations, one-step validation pseudo Dice ({args.val_iterations} batches)")
    print(f"{'trainer':<40}{'dice per class':<22}{'mean':>7}{'loss':>8}{'s':>7}")
    for r in rows:
        per = " ".join(f"{d:.3f}" for d in r["dice_per_class"])
        print(f"{r['trainer']:<40}{per:<22}{r['mean_dice']:>7.3f}{r['train_loss']:>8.3f}{r['seconds']:>7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
