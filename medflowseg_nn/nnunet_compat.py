"""Every place where MedFlowSeg-nn relies on nnU-Net internals: private methods, module globals, conventions.

nnU-Net's *public* API (planners, trainers, ``nnUNetPredictor``'s public methods, export functions, the label and
plans managers) is used directly where needed. What is not public — a private method we call, a module global we
swap, a convention we must reproduce (mirror order, Gaussian constants), an attribute of a standard-library pool
— is reached only through this module. ``tests/test_nnunet_compat.py`` checks each of them against the installed
nnunetv2 and fails loudly when a release moves or renames one.

May be imported by ``medflowseg_nn.inference``, ``medflowseg_nn.cli``, ``planners`` and ``trainers``; never by
``medflowseg_nn.flow`` or ``medflowseg_nn.networks``.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing.pool
import os
from types import ModuleType
from typing import Iterator, Optional, Sequence

import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

#: the Gaussian importance map nnU-Net's sliding window uses (``_internal_predict_sliding_window_return_logits``)
GAUSSIAN_SIGMA_SCALE = 1.0 / 8
GAUSSIAN_VALUE_SCALING = 10
#: the name under which nnU-Net's trainer module refers to the predictor used by ``perform_actual_validation``
TRAINER_PREDICTOR_NAME = "nnUNetPredictor"
#: the name under which nnU-Net's trainer module refers to DistributedDataParallel (``initialize`` wraps with it)
TRAINER_DDP_NAME = "DDP"
#: nnU-Net's trainer module, imported only where a trainer hook needs it (:func:`trainer_module`)
TRAINER_MODULE = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"
#: private ``nnUNetPredictor`` methods called from here (checked to exist by the compat test)
PRIVATE_PREDICTOR_METHODS = ("_internal_get_sliding_window_slicers",
                             "_internal_get_data_iterator_from_lists_of_filenames")


def gaussian_importance_map(patch_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[*P]`` float16 Gaussian patch weights, exactly as nnU-Net's sliding window computes them."""
    return compute_gaussian(tuple(patch_size), sigma_scale=GAUSSIAN_SIGMA_SCALE,
                            value_scaling_factor=GAUSSIAN_VALUE_SCALING, device=device)


def mirror_combinations(allowed_mirroring_axes: Optional[Sequence[int]]) -> list[tuple[int, ...]]:
    """Tensor dims flipped for each network call of nnU-Net's ``_internal_maybe_mirror_and_predict``, in its call
    order (spatial axis ``a`` is tensor dim ``a + 2`` of ``[B, C, *P]``). ``[()]`` when mirroring is off."""
    if allowed_mirroring_axes is None:
        return [()]
    axes = [a + 2 for a in allowed_mirroring_axes]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def sliding_window_slicers(predictor, padded_shape: Sequence[int]) -> list[tuple]:
    """nnU-Net's sliding-window slicers (``(slice(None), *spatial)``) for an image padded to ``padded_shape``."""
    return predictor._internal_get_sliding_window_slicers(tuple(padded_shape))


def background_preprocessing(predictor, list_of_lists: list[list[str]], output_files: list[str],
                             num_processes: int, segs_from_prev_stage: Optional[list[Optional[str]]] = None
                             ) -> Iterator[dict]:
    """nnU-Net's background preprocessing of raw files: yields ``{'data', 'data_properties', 'ofile'}``; with
    ``segs_from_prev_stage`` (cascade) ``data`` ends with the one-hot foreground labels of each case's file."""
    return predictor._internal_get_data_iterator_from_lists_of_filenames(list_of_lists, segs_from_prev_stage,
                                                                         output_files, num_processes)


def pool_workers(pool: multiprocessing.pool.Pool) -> list:
    """The worker processes of a pool at this moment (to notice one dying, which the pool silently replaces)."""
    return list(pool._pool)


@contextlib.contextmanager
def _attribute_swapped(owner: object, name: str, value: object) -> Iterator[None]:
    """Set ``owner.name`` to ``value`` for the duration; the old value is restored afterwards."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def trainer_module() -> ModuleType:
    """nnU-Net's trainer module, imported on first use: it pulls in its logger's plotting stack (seaborn,
    matplotlib) and torch._dynamo, seconds of start-up that ``mfs_predict`` and its export workers never need."""
    return importlib.import_module(TRAINER_MODULE)


def validation_predictor(predictor_class: type) -> contextlib.AbstractContextManager:
    """Make nnU-Net's ``nnUNetTrainer.perform_actual_validation`` build ``predictor_class`` instead of its
    ``nnUNetPredictor`` (it looks the name up in its module at call time); restored afterwards."""
    return _attribute_swapped(trainer_module(), TRAINER_PREDICTOR_NAME, predictor_class)


def cpu_capable_ddp() -> contextlib.AbstractContextManager:
    """nnU-Net's ``initialize`` wraps the network as ``DDP(network, device_ids=[local_rank])``, which only works
    for CUDA modules: for a CPU module (gloo) drop ``device_ids``, as DistributedDataParallel requires."""
    ddp = getattr(trainer_module(), TRAINER_DDP_NAME)

    def wrap(module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in module.parameters())
        return ddp(module, device_ids=None if on_cpu else device_ids, **kwargs)

    return _attribute_swapped(trainer_module(), TRAINER_DDP_NAME, wrap)


@contextlib.contextmanager
def nonzero_da_threads() -> Iterator[None]:
    """nnU-Net's VRAM estimate calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which crashes for 0 (0 = no
    augmentation workers, a valid setting for training): present 1 for the duration."""
    value = os.environ.get("nnUNet_n_proc_DA")
    if value is not None and value.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if value is not None:
            os.environ["nnUNet_n_proc_DA"] = value
