"""Shared CLI plumbing: logging, device choice, and turning user errors into one-line messages."""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import sys
from typing import Callable, Optional

import torch

from medflowseg_nn.errors import UserError

logger = logging.getLogger("medflowseg_nn")

#: exceptions that mean "the user's input is wrong": reported as one line, exit code 2
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, EnvironmentError)


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
    """``cuda`` / ``cpu`` / ``mps``; ``None`` = cuda when available. Sets CPU threads like nnU-Net does."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cuda", "cpu", "mps"):
        raise UserError(f"-device must be cuda, cpu or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda was requested but torch sees no CUDA device — use -device cpu")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
    return torch.device(name)


def cli_errors(func: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main``: user errors become ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except (UserError, *USER_ERRORS) as e:
            if os.environ.get("MFS_DEBUG"):
                raise
            msg = str(e).strip().strip("'\"") or type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
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
