"""nnUNetTrainer subclasses of MedFlowSeg-nn, resolved by import (never by nnU-Net's name search)."""
from __future__ import annotations

import inspect


def get_trainer_class(name: str) -> type:
    """Our trainer classes by name; other names fall back to nnU-Net's own lookup (which needs an importable
    torchvision, i.e. a CUDA torch build)."""
    from trainers import mfs_trainer, variants
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for module in (mfs_trainer, variants):
        cls = getattr(module, name, None)
        if inspect.isclass(cls) and issubclass(cls, nnUNetTrainer):
            return cls
    if name == "nnUNetTrainer":
        return nnUNetTrainer
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        cls = recursive_find_trainer_class_by_name(name)
    except Exception as e:  # nnU-Net's search imports timm/torchvision, which fail with a CPU torch
        raise ValueError(f"unknown trainer {name!r}: not a MedFlowSeg trainer ({', '.join(available_trainers())}) "
                         f"and nnU-Net's trainer search failed ({type(e).__name__}: {e})") from e
    if cls is None:
        raise ValueError(f"unknown trainer {name!r}; MedFlowSeg trainers: {', '.join(available_trainers())}")
    return cls


def available_trainers() -> list[str]:
    from trainers import mfs_trainer, variants
    names = [n for m in (mfs_trainer, variants) for n, c in vars(m).items()
             if inspect.isclass(c) and n.startswith("MedFlowSegTrainer")]
    return sorted(set(names))
