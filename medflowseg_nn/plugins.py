"""Trainer and planner classes found by name at call time, through package entry points.

The library under ``medflowseg_nn/`` never imports ``medflowseg_nn.trainers`` or ``medflowseg_nn.planners``
(a test checks it): the CLIs ask this module for a class by name, and this module loads the modules that the
installed distributions register — ours in ``setup.cfg``, and any user package that declares its own:

* group ``medflowseg_nn.trainer_modules``: modules whose ``nnUNetTrainer`` subclasses are trainers by class name
  (``mfs_train -tr NAME``);
* group ``medflowseg_nn.planners``: ``NAME = module:Class`` of ``ExperimentPlanner`` subclasses
  (``mfs_plan_and_preprocess -pl NAME``).

Unlike nnU-Net's recursive trainer search, nothing imports torchvision, so a CPU build of torch works.
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from types import ModuleType

from medflowseg_nn.errors import UserError

TRAINER_GROUP = "medflowseg_nn.trainer_modules"
PLANNER_GROUP = "medflowseg_nn.planners"


def trainer_modules() -> list[ModuleType]:
    """The registered trainer modules, loaded."""
    return [ep.load() for ep in sorted(entry_points(group=TRAINER_GROUP), key=lambda e: e.name)]


def available_trainers() -> list[str]:
    """Names of the registered MedFlowSeg trainer classes."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return sorted({n for m in trainer_modules() for n, c in vars(m).items()
                   if inspect.isclass(c) and issubclass(c, nnUNetTrainer) and c is not nnUNetTrainer})


def get_trainer_class(name: str) -> type:
    """A trainer class by name: the registered modules first, then nnU-Net's own ``nnUNetTrainer``, then nnU-Net's
    name search (which needs an importable torchvision, i.e. a CUDA build of torch)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for module in trainer_modules():
        cls = getattr(module, name, None)
        if inspect.isclass(cls) and issubclass(cls, nnUNetTrainer):
            return cls
    if name == "nnUNetTrainer":
        return nnUNetTrainer
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        cls = recursive_find_trainer_class_by_name(name)
    except Exception as e:  # noqa: BLE001 - nnU-Net's search imports timm/torchvision, which fail with a CPU torch
        raise UserError(f"unknown trainer {name!r}: not a MedFlowSeg trainer ({', '.join(available_trainers())}) "
                        f"and nnU-Net's trainer search failed ({type(e).__name__}: {e})") from e
    if cls is None:
        raise UserError(f"unknown trainer {name!r}; MedFlowSeg trainers: {', '.join(available_trainers())}")
    return cls


def get_planner_class(name: str) -> type:
    """A registered experiment planner class by name (``-pl``)."""
    found = {ep.name: ep for ep in entry_points(group=PLANNER_GROUP)}
    if name not in found:
        raise UserError(f"unknown planner {name!r}; registered planners: {', '.join(sorted(found))}")
    return found[name].load()
