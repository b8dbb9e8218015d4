"""MedFlowSegTrainer_pairedImages: each loaded image trained twice per step — at t = 0, and on the sampler's own path
from that same forward's estimate — so that own-estimate training needs no separate estimate pass.

The default training (``own_estimate_fraction`` 1) spends, per step, a no-gradient forward of the t > 0 rows at
t = 0 (their one-step estimate x̂1) before the forward + backward of all B rows. In 2d (Hippocampus, batch 277) that
pass is 1.0 s of an 8.2 s step, the difference between 1.26× and 1.61× nnU-Net's step
(``benchmarks/RESULTS.md`` 2026-12-05 08:04). Here the data loader yields n = ceil(B / 2) images, and the network's
batch holds each twice (2n rows, the plans' batch up to rounding)::

    rows 0 … n−1   t = 0, x_t = x0 (prior-free where the field allows)   -> x̂1 (with gradient)
    rows n … 2n−1  the same images, t from the base time sampler, x_t = (1 − t) x0' + t · x̂1.detach()

Two forwards in sequence (the second needs the first's output), one backward; the loss is the default's over all
2n rows (the flow loss with the ground truth as target; the deep-supervision heads on the t = 0 rows, and on the
own-path rows with ``aux_on_own_estimate``). What changes against the default: exactly half of the rows at t = 0
and every other row on the own path (the class sets ``zero_fraction`` 0.5 and ``own_estimate_fraction`` 1 in the
plans it saves; they are not drawn per row: t = 0 exactly, ``zero_width`` unused), half as many distinct images
per step (and half the data loading and augmentation), and the own-path rows' estimate is taken from the
training-mode forward (dropout-free networks: the same function) instead of a separate call. Inference is
unchanged: a model trained this way predicts with the same plans and predictor.
"""
from __future__ import annotations

import math

import torch

from medflowseg_nn.errors import UserError
from medflowseg_nn.flow.label_space import prior_where_ignored
from medflowseg_nn.flow.loss import interpret_output
from medflowseg_nn.flow.own_estimate import own_estimate_path, takes_prior_free
from medflowseg_nn.flow.path import MixtureTimeSampler
from medflowseg_nn.pretrained import unwrap
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer, Target


def twice(x: Target) -> Target:
    """``x`` ``[n, …]`` stacked on itself ``[2n, …]`` (each tensor of a deep-supervision list)."""
    return [torch.cat([s, s]) for s in x] if isinstance(x, (list, tuple)) else torch.cat([x, x])


class MedFlowSegTrainer_pairedImages(MedFlowSegTrainer):
    #: what this step trains, written into the plans it saves: half of the rows at t = 0, every other on the own path
    flow_overrides = {"zero_fraction": 0.5, "own_estimate_fraction": 1.0}
    network_rows_per_image = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        """The parent's, refusing MIMO members: this step's own :meth:`_flow_loss` does not put the batch into the
        members' groups (``trainers.mimo.mimo_batch``), so a MIMO field would get rows it cannot group."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.flow_config.network.members > 1:
            raise UserError(f"{type(self).__name__} trains each image twice in one step and does not group rows "
                            "for MIMO or ensemble members; set flow_matching.network.mimo_members and "
                            "ensemble_members to 1 or use the default trainer (MedFlowSegTrainer_mimo2 / _ensemble4)")

    def _set_batch_size_and_oversample(self) -> None:
        """nnU-Net's batch size (per process under DDP), halved (rounded up) for the data loader: the network's
        batch holds every loaded image twice."""
        super()._set_batch_size_and_oversample()
        self.batch_size = max(1, math.ceil(self.batch_size / 2))

    def _flow_loss(self, image: torch.Tensor, target: Target) -> dict[str, torch.Tensor]:
        """``image`` ``[n, C, *S]``, ``target`` as the parent's; the losses of the 2n rows (module docstring)."""
        c, multilabel = self.flow_config, self.label_manager.has_regions
        n = image.shape[0]
        target = twice(target)
        encoded = self.encode_target(target[0] if isinstance(target, (list, tuple)) else target)
        x0 = torch.randn_like(encoded.x1)
        base = self.time_sampler.base if isinstance(self.time_sampler, MixtureTimeSampler) else self.time_sampler
        t = torch.cat([torch.zeros(n, device=x0.device), base.sample(n, device=x0.device)])
        path = self.path.sample(x0, prior_where_ignored(encoded.x1, x0, encoded.mask), t)
        first = self.network(image, None if takes_prior_free(unwrap(self.network)) else path.x_t[:n], t[:n])
        first = first if isinstance(first, (list, tuple)) else [first]
        moved = torch.arange(n, 2 * n, device=x0.device)  # the second copies, onto the path to the first's x̂1
        path = own_estimate_path(path, lambda rows: interpret_output(first[0], x0[:n], t[:n], c.parameterization,
                                                                     c.logit_scale, multilabel=multilabel).x1_hat,
                                 1.0, rows=moved)
        second = self.network(image, path.x_t[n:], t[n:])
        second = second if isinstance(second, (list, tuple)) else [second]
        outputs = [torch.cat([a, b]) for a, b in zip(first, second)]
        return self._with_aux_loss(self.loss(outputs[0], path, encoded.labels, encoded.mask), outputs, target, t, moved)
