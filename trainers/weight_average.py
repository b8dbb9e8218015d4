"""MedFlowSegTrainer_ema: predict with an exponential moving average (EMA) of the network's weights.

Flow-matching and diffusion models are usually sampled with EMA weights; this variant measures what they do for
the one-step flow segmenter (issue #9). The average is torch's :class:`torch.optim.swa_utils.AveragedModel` with
its EMA update (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`): maintained code, a state dict that carries its
own count. The decay follows the training's length: a window of :attr:`MedFlowSegTrainer_ema.ema_window_fraction`
of all iterations (decay 1 − 1 / window), warmed up as timm's ``ModelEmaV3`` (at most (1 + n) / (10 + n) at the
n-th update), so that the first iterations' weights fade quickly. The warm-up binds until it reaches the window: the
average spans about the last n / 9 updates, i.e. ~11 % of the training so far, whatever longer window is asked for
(probe, ``benchmarks/RESULTS.md`` 2026-12-06 04:31: windows 100 / 200 / 400 of 1000 updates gave one average).

What uses which weights: training updates the average after every optimiser step; the per-epoch validation (pseudo
Dice, ``checkpoint_best.pth``) sees the training weights; at the end of training the averaged parameters replace the
network's, so ``checkpoint_final.pth``, the final validation, its temperature and ``mfs_predict`` use the average.
Every other checkpoint gets a companion ``<name>_weight_average.pth`` (the average, epoch-stamped) from which
``--c`` resumes it; without one (or from another epoch) the average restarts from the loaded weights, logged.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer

logger = logging.getLogger(__name__)


def ema_decay(window: float, update: int) -> float:
    """Decay of the ``update``-th average update (1, 2, …): 1 − 1 / ``window``, warmed up to (1 + n) / (10 + n)."""
    if window < 1:
        raise ValueError(f"the EMA window must be at least 1 update, got {window}")
    return min(1.0 - 1.0 / window, (1.0 + update) / (10.0 + update))


class WeightAverage:
    """An EMA of ``network``'s parameters (buffers are the network's own: its norms keep no running statistics).

    ``update(network)`` after each optimiser step; ``copy_to(network)`` writes the average into it."""

    def __init__(self, network: nn.Module, window: float):
        ema_decay(window, 1)  # checks the window
        self.window = float(window)
        self.model = AveragedModel(network, use_buffers=False)

    @property
    def updates(self) -> int:
        return int(self.model.n_averaged)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """One EMA step towards ``network``'s parameters (the first update copies them)."""
        self.model.multi_avg_fn = get_ema_multi_avg_fn(ema_decay(self.window, self.updates))
        self.model.update_parameters(network)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        for averaged, own in zip(self.model.module.parameters(), network.parameters()):
            own.copy_(averaged)

    def state_dict(self) -> dict:
        return {"window": self.window, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window = float(state["window"])
        self.model.load_state_dict(state["model"])


def companion_path(checkpoint: str) -> str:
    """``…/checkpoint_latest.pth`` → ``…/checkpoint_latest_weight_average.pth``."""
    root, ext = os.path.splitext(checkpoint)
    return f"{root}_weight_average{ext or '.pth'}"


def holds_average(checkpoint: str) -> bool:
    """``checkpoint_final.pth`` is written after the average replaced the weights: it needs no companion."""
    return os.path.basename(checkpoint) == "checkpoint_final.pth"


class MedFlowSegTrainer_ema(MedFlowSegTrainer):
    """The defaults, predicting with an EMA of the weights over the last :attr:`ema_window_fraction` of training."""

    #: EMA window as a fraction of all training iterations (num_epochs × num_iterations_per_epoch)
    ema_window_fraction: float = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weight_average: Optional[WeightAverage] = None
        self._resumed_average: Optional[dict] = None

    def on_train_start(self) -> None:
        super().on_train_start()
        window = max(1.0, self.ema_window_fraction * self.num_epochs * self.num_iterations_per_epoch)
        self.weight_average = WeightAverage(unwrap(self.network), window)
        if self._resumed_average is not None:
            self.weight_average.load_state_dict(self._resumed_average)
            self._resumed_average = None
        self.print_to_log_file(f"EMA of the weights: window {self.weight_average.window:.0f} iterations, "
                               f"{self.weight_average.updates} updates so far")

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        if self.weight_average is not None:  # None only for a train_step outside run_training (on_train_start)
            self.weight_average.update(unwrap(self.network))
        return out

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing or self.weight_average is None \
                or holds_average(filename):
            return
        companion = companion_path(filename)
        torch.save({"current_epoch": self.current_epoch + 1, **self.weight_average.state_dict()}, f"{companion}.tmp")
        os.replace(f"{companion}.tmp", companion)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        path = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else None  # None: a dict
        companion = companion_path(path) if path is not None else None
        saved = torch.load(companion, map_location=self.device, weights_only=False) \
            if companion is not None and os.path.isfile(companion) else None
        self._resumed_average = saved if saved is not None and saved["current_epoch"] == self.current_epoch else None
        final = path is not None and holds_average(path)
        if self._resumed_average is None and not final:
            logger.warning("no weight average saved with this checkpoint (epoch %d): it restarts from the loaded "
                           "weights", self.current_epoch)

    def on_train_end(self) -> None:
        if self.weight_average is not None and self.weight_average.updates > 0:
            self.weight_average.copy_to(unwrap(self.network))
            self.print_to_log_file(f"The network now holds the EMA of its weights ({self.weight_average.updates} "
                                   "updates): checkpoint_final.pth and the final validation use it")
        super().on_train_end()
        latest = companion_path(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0 and os.path.isfile(latest):
            os.remove(latest)
