"""torch.distributed for training: join the process group that ``torchrun`` (or ``mfs_train -num_gpus N``) sets up.

``torchrun --nproc_per_node G [--nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT] $(which mfs_train) ...``
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` joins it
with ``init_method="env://"``, backend ``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and ``gloo``
on the CPU, so the same code path runs on a laptop, these CPU machines and a GPU cluster. nnU-Net's trainer then
sees an initialised group and runs its DDP machinery (per-rank batch size and oversampling, rank-0 logging and
checkpoints, barriers). Collectives time out after ``MFS_DDP_TIMEOUT`` seconds (default 1800), so a rank that
hangs or dies ends the job with an error instead of a silent wait.

Imports no nnU-Net module; may be imported by the CLIs and the trainers.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from medflowseg_nn.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    """What torchrun told this process: global ``rank`` of ``world_size``, ``local_rank`` on this node."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_environment() -> Optional[DistributedEnv]:
    """The torchrun variables of this process, or ``None`` when it was not started by torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return DistributedEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                              int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError as e:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); start with torchrun") from e


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(env: DistributedEnv, device: torch.device) -> Iterator[torch.device]:
    """Join (and finally leave) the process group of ``env``; yields this process's device."""
    timeout = datetime.timedelta(seconds=float(os.environ.get("MFS_DDP_TIMEOUT", "1800")))
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s) — "
                            "use --nproc_per_node <= number of GPUs")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://", timeout=timeout)
    logger.info("rank %d of %d (local rank %d) joined the %s process group on %s", env.rank, env.world_size,
                env.local_rank, backend_for(device), device)
    try:
        yield device
        # every rank done before any tears down: a gloo rank whose peer destroys the group while its own last
        # collectives are still in flight can abort ("terminate called without an active exception", seen once in
        # tests/test_distributed.py); not on an error path, where a peer may never arrive
        dist.barrier()
    finally:
        dist.destroy_process_group()
