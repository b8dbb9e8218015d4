"""trainers.checkpoint_files: the trainer knows which checkpoint file its weights are, and saves atomically."""
from __future__ import annotations

import os

from tests.trainers.test_train_and_validation_step import make_trainer, planned  # noqa: F401


def test_the_trainer_names_the_checkpoint_file_its_weights_came_from(planned):
    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    trainer = make_trainer(planned, MedFlowSegTrainer)
    assert trainer.weights_file is None  # not trained, nothing loaded
    path = os.path.join(trainer.output_folder, "checkpoint_best.pth")
    trainer.save_checkpoint(path)
    assert os.path.isfile(path) and not os.path.exists(f"{path}.tmp")  # written, then renamed
    trainer.load_checkpoint(path)
    assert trainer.weights_file == "checkpoint_best.pth"
