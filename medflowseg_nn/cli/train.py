"""``mfs_train DATASET CONFIGURATION FOLD``: train a MedFlowSeg model with nnU-Net's training loop.

Flags follow ``nnUNetv2_train``. Trainer classes are resolved by import (see :func:`medflowseg_nn.plugins.get_trainer_class`),
never through nnU-Net's name search, which fails with a CPU build of torch.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence, Union

import torch

from medflowseg_nn.cli.common import cli_errors, dataset_name, pick_device, require_env, setup_logging
from medflowseg_nn.distributed import process_group, torchrun_environment
from medflowseg_nn.cpu_allocator import tune_cpu_allocator
from medflowseg_nn.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TRAINER = "MedFlowSegTrainer"
DEFAULT_PLANS = "MedFlowSegPlans"


def resolve_trainer_name(trainer: str, no_dbsa: bool = False, no_faa: bool = False) -> str:
    """``--no_dbsa`` / ``--no_faa`` select the matching ablation variant of the default trainer."""
    if not (no_dbsa or no_faa):
        return trainer
    if trainer != DEFAULT_TRAINER:
        raise UserError(f"--no_dbsa/--no_faa select a variant of {DEFAULT_TRAINER}; with -tr {trainer} pick "
                        f"the variant class directly (e.g. -tr {DEFAULT_TRAINER}_noAttention)")
    return DEFAULT_TRAINER + ("_noAttention" if no_dbsa and no_faa else "_noDBSA" if no_dbsa else "_noFAA")


def build_trainer(dataset: str, configuration: str, fold: Union[int, str], trainer: str = DEFAULT_TRAINER,
                  plans: str = DEFAULT_PLANS, continue_training: bool = False,
                  device: torch.device = torch.device("cpu")):
    """Instantiate a trainer the way nnU-Net does, with clear errors for missing inputs."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from medflowseg_nn.plugins import get_trainer_class

    preprocessed = require_env("nnUNet_preprocessed")
    require_env("nnUNet_results")
    name = dataset_name(dataset)
    plans_file = join(preprocessed, name, plans + ".json")
    if not isfile(plans_file):
        raise UserError(f"plans file {plans_file} not found — run `mfs_plan_and_preprocess -d {dataset}` first "
                        f"(or pass -p with an existing plans identifier)")
    plans_dict = load_json(plans_file)
    if configuration not in plans_dict["configurations"]:
        raise UserError(f"configuration {configuration!r} is not in {plans_file}; available: "
                        f"{', '.join(plans_dict['configurations'])}")
    plans_dict["continue_training"] = continue_training
    trainer_class = get_trainer_class(trainer)
    return trainer_class(plans=plans_dict, configuration=configuration, fold=fold,
                         dataset_json=load_json(join(preprocessed, name, "dataset.json")), device=device)


def train_one(trainer, continue_training: bool, only_run_validation: bool, pretrained_weights: Optional[str],
               npz: bool, disable_checkpointing: bool, val_with_best: bool, quiet: bool = False) -> None:
    from batchgenerators.utilities.file_and_folder_operations import isfile, join
    from nnunetv2.run.run_training import maybe_load_checkpoint

    trainer.disable_checkpointing = disable_checkpointing
    if quiet and hasattr(trainer, "show_progress"):
        trainer.show_progress = False
    if only_run_validation and not isfile(join(trainer.output_folder, "checkpoint_final.pth")):
        raise UserError(f"--val needs {join(trainer.output_folder, 'checkpoint_final.pth')} — finish training first")
    maybe_load_checkpoint(trainer, continue_training, only_run_validation, None)
    if pretrained_weights is not None:
        load_pretrained(trainer, pretrained_weights)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not only_run_validation:
        trainer.run_training()
    if val_with_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(npz)


def load_pretrained(trainer, path: str) -> None:
    """``-pretrained_weights``: initialise the trainer's network from an nnU-Net or MedFlowSeg checkpoint
    (:mod:`medflowseg_nn.pretrained`: what corresponds is copied, the rest keeps its initialisation)."""
    from medflowseg_nn.pretrained import load_pretrained_weights

    if not trainer.was_initialized:
        trainer.initialize()
    flow_config = getattr(trainer, "flow_config", None)
    load_pretrained_weights(trainer.network, path, labels=trainer.dataset_json["labels"],
                            parameterization=flow_config.parameterization if flow_config else "x1",
                            log=lambda line: (logger.info(line),
                                              trainer.print_to_log_file(line, also_print_to_console=False)))


def spawned_rank(rank: int, world_size: int, device_type: str, kwargs: dict, run_kwargs: dict) -> None:
    """One process of ``-num_gpus N``: torchrun's environment for this rank, then the torchrun code path."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    env = torchrun_environment()
    with process_group(env, torch.device(device_type)) as device:
        train_one(build_trainer(device=device, **kwargs), **run_kwargs)


def run_training(dataset: str, configuration: str, fold: Union[int, str], trainer: str = DEFAULT_TRAINER,
                 plans: str = DEFAULT_PLANS, pretrained_weights: Optional[str] = None, num_gpus: int = 1,
                 npz: bool = False, continue_training: bool = False, only_run_validation: bool = False,
                 disable_checkpointing: bool = False, val_with_best: bool = False,
                 device: torch.device = torch.device("cpu"), quiet: bool = False):
    """Train (and validate) one fold; returns the trainer (``None`` for ``num_gpus > 1``).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) every process joins the process group (nccl on CUDA, gloo on
    the CPU) and trains its share of each batch; ``num_gpus > 1`` spawns that many such processes here."""
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError as e:
            raise UserError(f"fold must be an integer or 'all', got {fold!r}") from e
    if continue_training and only_run_validation:
        raise UserError("--c and --val cannot be used together")
    if pretrained_weights is not None and (continue_training or only_run_validation):
        raise UserError(f"-pretrained_weights starts a new training; it cannot be combined with "
                        f"{'--c (continue)' if continue_training else '--val'} — drop one of them")
    if pretrained_weights is not None and not os.path.isfile(pretrained_weights):
        raise UserError(f"pretrained weights {pretrained_weights} not found — pass a checkpoint_final.pth of "
                        "mfs_train or nnUNetv2_train")
    if val_with_best and disable_checkpointing:
        raise UserError("--val_best is not compatible with --disable_checkpointing")
    kwargs = dict(dataset=dataset, configuration=configuration, fold=fold, trainer=trainer, plans=plans,
                  continue_training=continue_training)
    run_kwargs = dict(continue_training=continue_training, only_run_validation=only_run_validation,
                      pretrained_weights=pretrained_weights, npz=npz, disable_checkpointing=disable_checkpointing,
                      val_with_best=val_with_best, quiet=quiet)
    env = torchrun_environment()
    if env is not None:
        if num_gpus > 1:
            raise UserError("-num_gpus N and torchrun both start processes; under torchrun use --nproc_per_node")
        with process_group(env, device) as rank_device:
            trainer_obj = build_trainer(device=rank_device, **kwargs)
            train_one(trainer_obj, **run_kwargs)
        return trainer_obj
    if num_gpus > 1:
        import torch.multiprocessing as mp
        from nnunetv2.run.run_training import find_free_network_port
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
        mp.spawn(spawned_rank, args=(num_gpus, device.type, kwargs, run_kwargs), nprocs=num_gpus, join=True)
        return None
    trainer_obj = build_trainer(device=device, **kwargs)
    train_one(trainer_obj, **run_kwargs)
    return trainer_obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_train", description=__doc__)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration", help="2d, 3d_fullres, 3d_lowres, ...")
    p.add_argument("fold", help="0-4 or 'all'")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default=DEFAULT_PLANS, help=f"plans identifier (default {DEFAULT_PLANS})")
    p.add_argument("-pretrained_weights", default=None, metavar="FILE",
                   help="start from an nnU-Net or MedFlowSeg checkpoint (same plans): matching weights are copied, "
                        "the first conv's x_t channels start at zero; not with --c / --val")
    p.add_argument("-num_gpus", type=int, default=1,
                   help="start N DDP processes on this machine (nccl on cuda, gloo on cpu); for several machines "
                        "use torchrun")
    p.add_argument("--npz", action="store_true", help="export softmax probabilities of the final validation")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the final validation")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best.pth")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("--no_dbsa", action="store_true", help="ablation: no Dual-Branch Spatial Attention")
    p.add_argument("--no_faa", action="store_true", help="ablation: no Frequency-Aware Attention")
    p.add_argument("-device", default=None, help="cuda, cpu or mps (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--verbose", action="store_true")
    return p


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    tune_cpu_allocator()  # each iteration reuses the last one's pages (medflowseg_nn.cpu_allocator)
    run_training(dataset=args.dataset_name_or_id, configuration=args.configuration, fold=args.fold,
                 trainer=resolve_trainer_name(args.tr, no_dbsa=args.no_dbsa, no_faa=args.no_faa), plans=args.p,
                 pretrained_weights=args.pretrained_weights, num_gpus=args.num_gpus, npz=args.npz,
                 continue_training=args.c, only_run_validation=args.val,
                 disable_checkpointing=args.disable_checkpointing, val_with_best=args.val_best,
                 device=pick_device(args.device), quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
