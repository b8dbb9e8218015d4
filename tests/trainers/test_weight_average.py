"""``MedFlowSegTrainer_ema``: the EMA of the weights, by hand, through a tiny training, its checkpoints and --c."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from medflowseg_nn.trainers.weight_average import (MedFlowSegTrainer_ema, WeightAverage, companion_path,
                                                   ema_decay)
from tests.conftest import plan_synthetic_dataset, tiny_network_plans

CONFIG = "3d_fullres"


def test_ema_decay_is_the_window_decay_warmed_up():
    assert ema_decay(10, 1) == pytest.approx(2 / 11)  # warm-up: the second weights count 9/11
    assert ema_decay(10, 1000) == pytest.approx(0.9)
    assert ema_decay(1, 5) == 0.0  # a one-update window: the average is the last weights
    with pytest.raises(ValueError, match="at least 1"):
        ema_decay(0.5, 1)


def test_weight_average_matches_the_recursion_by_hand():
    net = nn.Linear(2, 1)
    average = WeightAverage(net, window=4)
    values = [1.0, 3.0, -2.0, 5.0]
    expected = None
    for n, value in enumerate(values):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        average.update(net)
        d = ema_decay(4, n)
        expected = value if expected is None else d * expected + (1 - d) * value
    assert average.updates == 4
    target = nn.Linear(2, 1)
    average.copy_to(target)
    for p in target.parameters():
        assert torch.allclose(p, torch.full_like(p, expected))
    restored = WeightAverage(nn.Linear(2, 1), window=99)
    restored.load_state_dict(average.state_dict())
    assert restored.window == 4 and restored.updates == 4


def test_companion_path():
    assert companion_path("/r/fold_0/checkpoint_latest.pth") == "/r/fold_0/checkpoint_latest_weight_average.pth"


class TinyEma(MedFlowSegTrainer_ema):
    trainer_overrides = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1}
    val_multistep_batches = 0
    ema_window_fraction = 0.5  # a window of 3 of the 6 iterations

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self.seen = getattr(self, "seen", []) + [[p.detach().clone() for p in self.network.parameters()]]
        return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        planned = plan_synthetic_dataset(tmp_path_factory.mktemp("ema"), mp, 983)
        torch.manual_seed(0)
        trainer = TinyEma(tiny_network_plans(planned.plans), CONFIG, 0, planned.dataset_json,
                          device=torch.device("cpu"))
        trainer.run_training()
        yield planned, trainer


def test_training_ends_with_the_hand_computed_average_in_the_network_and_checkpoint_final(trained):
    _, trainer = trained
    assert trainer.weight_average.window == 3 and trainer.weight_average.updates == 6
    expected = None
    for n, weights in enumerate(trainer.seen):
        d = ema_decay(3, n)
        expected = weights if expected is None else [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    final = list(trainer.network.parameters())
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(final, expected))
    assert not all(torch.equal(p, w) for p, w in zip(final, trainer.seen[-1]))  # not the last training weights
    saved = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert all(torch.equal(saved["network_weights"][k], v) for k, v in trainer.network.state_dict().items())
    folder = trainer.output_folder
    assert not os.path.exists(os.path.join(folder, "checkpoint_latest.pth"))
    assert not os.path.exists(companion_path(os.path.join(folder, "checkpoint_latest.pth")))
    assert not os.path.exists(companion_path(os.path.join(folder, "checkpoint_final.pth")))


def test_continue_training_resumes_the_average_or_restarts_it_with_a_warning(trained, tmp_path, caplog):
    planned, trainer = trained
    checkpoint = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(checkpoint)
    assert os.path.isfile(companion_path(checkpoint))
    resumed = TinyEma(tiny_network_plans(planned.plans), CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    resumed.load_checkpoint(checkpoint)
    resumed.on_train_start()
    try:
        assert resumed.weight_average.updates == 6
        for a, b in zip(resumed.weight_average.model.module.parameters(),
                        trainer.weight_average.model.module.parameters()):
            assert torch.equal(a, b)
    finally:
        resumed.on_train_end()
    os.remove(companion_path(checkpoint))
    fresh = TinyEma(tiny_network_plans(planned.plans), CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="medflowseg_nn"):
        fresh.load_checkpoint(checkpoint)
    assert fresh._resumed_average is None and "restarts from the loaded weights" in caplog.text
    caplog.clear()
    final = TinyEma(tiny_network_plans(planned.plans), CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="medflowseg_nn"):  # --val / --c after the end: no warning
        final.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    assert final._resumed_average is None and "restarts" not in caplog.text
