"""Which checkpoint file a trainer's network weights are, and checkpoints written atomically (a mixin placed before
``nnUNetTrainer`` in :class:`~medflowseg_nn.trainers.mfs_trainer.MedFlowSegTrainer`'s bases).

A fold's calibration (``temperature.json``; a packed ensemble's member temperatures) is fitted on the weights the
trainer holds at its final validation: ``checkpoint_final.pth`` after training or ``--val``, ``checkpoint_best.pth``
with ``--val_best`` (nnU-Net loads it before the validation). :attr:`CheckpointFiles.weights_file` names that file,
so the calibration is written with it and ``mfs_predict -chk`` applies a calibration only to the weights it was
fitted on (:func:`medflowseg_nn.temperature.load_calibration`), and the member temperatures go into that file,
never into another checkpoint's weights.
"""
from __future__ import annotations

import os
from typing import Optional, Union

FINAL_CHECKPOINT = "checkpoint_final.pth"


class CheckpointFiles:
    """nnU-Net trainer mixin: ``weights_file`` is the checkpoint (file name in the fold folder) whose weights the
    network holds — set when a checkpoint file is loaded and when training ends (``checkpoint_final.pth``);
    ``None`` before, or after weights were loaded from a dict."""

    weights_file: Optional[str] = None

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed: a run killed while saving never leaves a
        truncated checkpoint (``--c`` resumes from the previous one)."""
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)  # type: ignore[misc]
        if os.path.isfile(tmp):
            os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # type: ignore[misc]
        self.weights_file = os.path.basename(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) \
            else None

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]  # nnU-Net saves checkpoint_final.pth from these weights
        self.weights_file = FINAL_CHECKPOINT
