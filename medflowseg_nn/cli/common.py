"""Shared CLI plumbing: logging, device choice, and the error policy of every ``mfs_*`` command.

Error policy (:func:`cli_errors`): a :class:`~medflowseg_nn.errors.UserError` — raised where input is checked —
prints ``error: <advice>`` and exits 2; any other exception is a bug: its traceback is printed, then a one-line
summary, and the exit code is 1.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import sys
import traceback
from typing import Callable, Optional

import torch

from medflowseg_nn.errors import UserError, one_line

logger = logging.getLogger("medflowseg_nn")

def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("medflowseg_nn", "planners", "trainers"):
        logging.getLogger(name).setLevel(level)


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UserError(f"environment variable {name} is not set — export {name}=/path/to/folder "
                        f"(see nnU-Net's documentation/setting_up_paths.md)")
    return value


def pick_device(name: Optional[str]) -> torch.device:
    """``cuda`` / ``cpu`` / ``mps``; ``None`` = cuda when available.

    Like nnU-Net's entry points, this sets torch's thread count: all CPU cores for ``cpu``, 1 otherwise (the
    GPU does the work); logged at INFO."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cuda", "cpu", "mps"):
        raise UserError(f"-device must be cuda, cpu or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda was requested but torch sees no CUDA device — use -device cpu")
    threads = multiprocessing.cpu_count() if name == "cpu" else 1
    torch.set_num_threads(threads)
    logger.info("device %s, %d torch thread(s)", name, threads)
    return torch.device(name)


def cli_errors(func: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main`` with the error policy: :class:`UserError` → ``error: <message>`` on stderr, exit 2
    (``MFS_DEBUG=1`` re-raises it); any other exception → its traceback, ``error: internal error ...``, exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except UserError as e:
            if os.environ.get("MFS_DEBUG"):
                raise
            print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - a bug: show everything
            traceback.print_exc(file=sys.stderr)
            print(f"error: internal error ({one_line(e)}); the traceback above says where — please report it",
                  file=sys.stderr)
            return 1
    return wrapper


def dataset_name(dataset_name_or_id: str) -> str:
    """``4`` / ``Dataset004_Hippocampus`` → ``Dataset004_Hippocampus``, with a clear error when unknown."""
    require_env("nnUNet_raw")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(str(dataset_name_or_id) if not str(dataset_name_or_id).isdigit()
                                             else int(dataset_name_or_id))
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise UserError(f"unknown dataset {dataset_name_or_id!r}: no Dataset{str(dataset_name_or_id).zfill(3)}_* "
                        f"folder in nnUNet_raw ({os.environ.get('nnUNet_raw')}), nnUNet_preprocessed or "
                        f"nnUNet_results") from e
